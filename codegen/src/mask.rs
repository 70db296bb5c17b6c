//! `ir::Mask` -> three C expressions over the primitives of `templates/tile.cuh`:
//!
//! - the element predicate (`j in S(i)`), used only in Partial tiles;
//! - the block class of a query range x key range (Skip / Partial / Full,
//!   encoded 0 / 1 / 2 so `&&` is `min` and `||` is `max`), the device mirror
//!   of [`crate::plan::classify`];
//! - a key interval that contains every key any query of a range may see, so
//!   the kernel's tile loop starts and stops at the right place (causal stops
//!   at the diagonal, windows start late).
//!
//! Segment masks depend on data: the predicate compares the two ids, and the
//! class reads a per-tile class the kernel computes from the ids of the tile
//! (exact summary: skip when no key id lies in the query block's id range).
//!
//! Expression masks (`Mask::Expr`, FlexAttention's `mask_mod`: a boolean
//! expression of `i`, `j`, `h`, `b`, `seq`, `kv_seq` and tables) lower their
//! predicate with [`crate::expr`] (tables read through their kernel pointer
//! parameters, CTA-constant parts hoisted with the bias's). Their class
//! bounds the condition over the tile with `mask.cuh`'s interval helpers
//! (the rules of `mixc_dsl::bounds`; the CTA's head, batch row, lengths and
//! tables read at them are points), so chunked attention and per-head
//! windows skip tiles on the device too; a table read at a position makes
//! the class Partial. Their key range is every key.

use crate::expr::{lower_expr, Hoisted, LowerEnv};
use crate::CodegenError;
use mixc_dsl::ir::{BinOp, Expr, Func, Mask, ScalarType, UnOp, Var};

/// C names the lowered expressions read.
#[derive(Debug, Clone)]
pub struct MaskNames<'a> {
    /// Element positions (global).
    pub i: &'a str,
    pub j: &'a str,
    /// Segment ids of i and j.
    pub seg_i: &'a str,
    pub seg_j: &'a str,
    /// Inclusive global position ranges of a tile.
    pub i0: &'a str,
    pub i1: &'a str,
    pub j0: &'a str,
    pub j1: &'a str,
    /// The data-dependent class of the segment primitive for the current tile.
    pub seg_class: &'a str,
}

impl Default for MaskNames<'static> {
    fn default() -> Self {
        MaskNames {
            i: "pos_i",
            j: "pos_j",
            seg_i: "seg_i",
            seg_j: "seg_j",
            i0: "i0",
            i1: "i1",
            j0: "j0",
            j1: "j1",
            seg_class: "seg_class",
        }
    }
}

/// A mask lowered for one template.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoweredMask {
    /// `bool`: does query i see key j.
    pub predicate: String,
    /// `int`: class of the tile `[i0, i1] x [j0, j1]`.
    pub class: String,
    /// `mixc::KeyRange`: keys `[lo, hi)` that may be visible to some query in `[i0, i1]`.
    pub key_range: String,
    /// The segment-id input, when the mask reads one.
    pub segment_input: Option<String>,
    /// Every tile is Full (no masking at all): lets templates drop mask code.
    pub all: bool,
}

/// How a template lowers the expressions of expression masks: its names for
/// the variables and inputs (`i` and `j` are taken from [`MaskNames`]), and
/// the hoisted per-CTA values it prints, shared with the bias and transform.
pub struct MaskExprs<'e, 'h> {
    pub env: &'e LowerEnv<'e>,
    pub hoisted: &'h mut Vec<Hoisted>,
}

/// Sizes past the `int` range cover any sequence an `int` position can index.
fn int_const(v: u64, _what: &str) -> Result<String, CodegenError> {
    Ok(i32::try_from(v).unwrap_or(i32::MAX).to_string())
}

fn check_rates(m: &Mask) -> Result<(), CodegenError> {
    match m {
        Mask::Dilated { rate: 0 } => Err(CodegenError::Expr {
            expr: "dilated(0)".into(),
            reason: "dilation rate must be >= 1".into(),
        }),
        Mask::BlockSparse { block: 0, .. } => Err(CodegenError::Expr {
            expr: "block_sparse(block = 0, ..)".into(),
            reason: "block must be >= 1".into(),
        }),
        Mask::And(a, b) | Mask::Or(a, b) => check_rates(a).and(check_rates(b)),
        _ => Ok(()),
    }
}

/// Lowers a mask without expression masks in it (an expression mask is
/// [`CodegenError::Unsupported`] here: use [`lower_mask_with`]).
pub fn lower_mask(
    mask: &Mask,
    n: &MaskNames<'_>,
    spec_name: &str,
) -> Result<LoweredMask, CodegenError> {
    lower_mask_with(mask, n, None, spec_name)
}

/// Lowers a mask; expression masks are lowered with `exprs`.
pub fn lower_mask_with(
    mask: &Mask,
    n: &MaskNames<'_>,
    mut exprs: Option<MaskExprs<'_, '_>>,
    spec_name: &str,
) -> Result<LoweredMask, CodegenError> {
    check_rates(mask)?;
    let mut segs = Vec::new();
    mask.segment_inputs(&mut segs);
    if segs.len() > 1 {
        return Err(CodegenError::Unsupported {
            spec: spec_name.into(),
            what: format!(
                "masks over more than one segment input ({})",
                segs.join(", ")
            ),
        });
    }
    Ok(LoweredMask {
        predicate: predicate(mask, n, &mut exprs, spec_name)?,
        class: class(mask, n, &mut exprs)?,
        key_range: key_range(mask, n)?,
        segment_input: segs.pop(),
        all: matches!(mask, Mask::All),
    })
}

fn predicate(
    m: &Mask,
    n: &MaskNames<'_>,
    exprs: &mut Option<MaskExprs<'_, '_>>,
    spec_name: &str,
) -> Result<String, CodegenError> {
    let (i, j) = (n.i, n.j);
    Ok(match m {
        Mask::All => "true".into(),
        Mask::Expr(e) => {
            let Some(x) = exprs else {
                return Err(CodegenError::Unsupported {
                    spec: spec_name.into(),
                    what: format!(
                        "expression mask `{e}` in a kernel that has no names for its variables"
                    ),
                });
            };
            let env = LowerEnv {
                i,
                j,
                ..x.env.clone()
            };
            let c = lower_expr(e, &env, x.hoisted)?;
            if c.ty != ScalarType::Bool {
                return Err(CodegenError::Expr {
                    expr: e.to_string(),
                    reason: "a mask expression must be a condition".into(),
                });
            }
            c.code
        }
        Mask::Causal => format!("({j} <= {i})"),
        Mask::Window { size } => format!("(abs({i} - {j}) < {})", int_const(*size, "window")?),
        Mask::PrefixLm { prefix } => {
            format!("({j} < {} || {j} <= {i})", int_const(*prefix, "prefix")?)
        }
        Mask::Segment { .. } => format!("({} == {})", n.seg_i, n.seg_j),
        Mask::BlockSparse {
            block,
            local,
            global,
        } => format!(
            "mixc::block_sparse_allows({i}, {j}, {}, {}, {})",
            int_const(*block, "block")?,
            int_const(*local, "local")?,
            int_const(*global, "global")?
        ),
        Mask::Dilated { rate } => format!(
            "(mixc::mod_floor({i} - {j}, {}) == 0)",
            int_const(*rate, "dilation rate")?
        ),
        Mask::And(a, b) => format!(
            "({} && {})",
            predicate(a, n, exprs, spec_name)?,
            predicate(b, n, exprs, spec_name)?
        ),
        Mask::Or(a, b) => format!(
            "({} || {})",
            predicate(a, n, exprs, spec_name)?,
            predicate(b, n, exprs, spec_name)?
        ),
    })
}

fn class(
    m: &Mask,
    n: &MaskNames<'_>,
    exprs: &mut Option<MaskExprs<'_, '_>>,
) -> Result<String, CodegenError> {
    let r = format!("{}, {}, {}, {}", n.i0, n.i1, n.j0, n.j1);
    Ok(match m {
        Mask::All => "mixc::FULL".into(),
        // The condition bounded over the tile (mixc_dsl::bounds's rules in
        // mask.cuh); Partial where it reads what the device cannot bound.
        Mask::Expr(e) => match exprs.as_mut().and_then(|x| bounds_code(e, n, x)) {
            Some(iv) => format!("mixc::class_of_iv({iv})"),
            None => "mixc::PARTIAL".into(),
        },
        Mask::Causal => format!("mixc::class_causal({r})"),
        Mask::Window { size } => {
            format!("mixc::class_window({r}, {})", int_const(*size, "window")?)
        }
        Mask::PrefixLm { prefix } => {
            format!(
                "mixc::class_prefix_lm({r}, {})",
                int_const(*prefix, "prefix")?
            )
        }
        Mask::Segment { .. } => n.seg_class.to_string(),
        Mask::BlockSparse {
            block,
            local,
            global,
        } => format!(
            "mixc::class_block_sparse({r}, {}, {}, {})",
            int_const(*block, "block")?,
            int_const(*local, "local")?,
            int_const(*global, "global")?
        ),
        Mask::Dilated { rate } => format!(
            "mixc::class_dilated({r}, {})",
            int_const(*rate, "dilation rate")?
        ),
        Mask::And(a, b) => format!(
            "mixc::class_and({}, {})",
            class(a, n, exprs)?,
            class(b, n, exprs)?
        ),
        Mask::Or(a, b) => format!(
            "mixc::class_or({}, {})",
            class(a, n, exprs)?,
            class(b, n, exprs)?
        ),
    })
}

/// C code of a `mixc::Iv` bounding `e` over the tile `[i0, i1] x [j0, j1]`.
/// A part that reads neither `i` nor `j` is one value per CTA (head, batch
/// row, lengths, tables read at those): its point, lowered (and hoisted) as
/// the predicate lowers it. `None` where a table is read at a position,
/// which the device does not bound.
fn bounds_code(e: &Expr, n: &MaskNames<'_>, x: &mut MaskExprs<'_, '_>) -> Option<String> {
    if !e.uses_var(Var::I) && !e.uses_var(Var::J) && !e.uses_var(Var::S) {
        let env = LowerEnv {
            i: n.i,
            j: n.j,
            ..x.env.clone()
        };
        let c = lower_expr(e, &env, x.hoisted).ok()?;
        return Some(format!("mixc::iv_pt((double)({}))", c.code));
    }
    let env = x.env;
    let mut sub = |y: &Expr| bounds_code(y, n, x);
    Some(match e {
        Expr::Int(v) => format!("mixc::iv_pt({v}.0)"),
        Expr::Float(v) => format!("mixc::iv_pt({v:?})"),
        Expr::Var(Var::I) => format!("mixc::iv((double){}, (double){})", n.i0, n.i1),
        Expr::Var(Var::J) => format!("mixc::iv((double){}, (double){})", n.j0, n.j1),
        Expr::Var(Var::H) => format!("mixc::iv_pt((double){})", env.h),
        Expr::Var(Var::B) => format!("mixc::iv_pt((double){})", env.b),
        Expr::Var(Var::Seq) => format!("mixc::iv_pt((double){})", env.seq),
        Expr::Var(Var::KvSeq) => format!("mixc::iv_pt((double){})", env.kv_seq),
        Expr::Var(Var::S) | Expr::Index { .. } => return None,
        Expr::Unary(UnOp::Neg, a) => format!("mixc::iv_neg({})", sub(a)?),
        Expr::Unary(UnOp::Not, a) => format!("mixc::iv_not({})", sub(a)?),
        Expr::Binary(op, a, b) => {
            let f = match op {
                BinOp::Add => "add",
                BinOp::Sub => "sub",
                BinOp::Mul => "mul",
                BinOp::Div => "div",
                BinOp::Rem => "rem",
                BinOp::Lt => "lt",
                BinOp::Le => "le",
                BinOp::Gt => "gt",
                BinOp::Ge => "ge",
                BinOp::Eq => "eq",
                BinOp::Ne => "ne",
                BinOp::And => "and",
                BinOp::Or => "or",
            };
            let (a, b) = (sub(a)?, sub(b)?);
            format!("mixc::iv_{f}({a}, {b})")
        }
        Expr::Call(f, args) => {
            let a: Vec<String> = args.iter().map(&mut sub).collect::<Option<_>>()?;
            let name = match f {
                Func::Exp => "exp",
                Func::Log => "log",
                Func::Sqrt => "sqrt",
                Func::Tanh => "tanh",
                Func::Sigmoid => "sigmoid",
                Func::Floor => "floor",
                Func::Int => "trunc",
                Func::Abs => "abs",
                Func::Min => "min",
                Func::Max => "max",
                Func::Clamp => "clamp",
                Func::Select => "select",
                Func::Div => "floordiv",
                // Every value lies in [-1, 1], every slope in (0, 1].
                Func::Sin | Func::Cos => return Some("mixc::iv_unit()".into()),
                Func::AlibiSlope => return Some("mixc::iv(0.0, 1.0)".into()),
                Func::Pow => return Some("mixc::iv_any()".into()),
            };
            format!("mixc::iv_{name}({})", a.join(", "))
        }
    })
}

fn key_range(m: &Mask, n: &MaskNames<'_>) -> Result<String, CodegenError> {
    let (i0, i1) = (n.i0, n.i1);
    Ok(match m {
        Mask::Causal => format!("mixc::range_causal({i0}, {i1})"),
        Mask::Window { size } => {
            format!(
                "mixc::range_window({i0}, {i1}, {})",
                int_const(*size, "window")?
            )
        }
        Mask::PrefixLm { prefix } => {
            format!(
                "mixc::range_prefix_lm({i0}, {i1}, {})",
                int_const(*prefix, "prefix")?
            )
        }
        Mask::BlockSparse {
            block,
            local,
            global,
        } => format!(
            "mixc::range_block_sparse({i0}, {i1}, {}, {}, {})",
            int_const(*block, "block")?,
            int_const(*local, "local")?,
            int_const(*global, "global")?
        ),
        // Data-dependent or unbounded: every key may be visible.
        Mask::All | Mask::Segment { .. } | Mask::Dilated { .. } | Mask::Expr(_) => {
            "mixc::range_all()".into()
        }
        Mask::And(a, b) => format!(
            "mixc::range_intersect({}, {})",
            key_range(a, n)?,
            key_range(b, n)?
        ),
        Mask::Or(a, b) => format!(
            "mixc::range_hull({}, {})",
            key_range(a, n)?,
            key_range(b, n)?
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn and(a: Mask, b: Mask) -> Mask {
        Mask::And(Box::new(a), Box::new(b))
    }
    fn or(a: Mask, b: Mask) -> Mask {
        Mask::Or(Box::new(a), Box::new(b))
    }

    #[test]
    fn longnet_mask_lowers_compositionally() {
        let m = and(
            Mask::Causal,
            or(Mask::Window { size: 512 }, Mask::Dilated { rate: 8 }),
        );
        let l = lower_mask(&m, &MaskNames::default(), "t").unwrap();
        assert_eq!(
            l.predicate,
            "((pos_j <= pos_i) && ((abs(pos_i - pos_j) < 512) || (mixc::mod_floor(pos_i - pos_j, 8) == 0)))"
        );
        assert_eq!(
            l.class,
            "mixc::class_and(mixc::class_causal(i0, i1, j0, j1), \
             mixc::class_or(mixc::class_window(i0, i1, j0, j1, 512), \
             mixc::class_dilated(i0, i1, j0, j1, 8)))"
        );
        assert_eq!(
            l.key_range,
            "mixc::range_intersect(mixc::range_causal(i0, i1), \
             mixc::range_hull(mixc::range_window(i0, i1, 512), mixc::range_all()))"
        );
        assert!(l.segment_input.is_none() && !l.all);
    }

    #[test]
    fn segment_reads_the_run_time_class() {
        let m = and(
            Mask::Causal,
            Mask::Segment {
                input: "doc".into(),
            },
        );
        let l = lower_mask(&m, &MaskNames::default(), "t").unwrap();
        assert_eq!(l.segment_input.as_deref(), Some("doc"));
        assert!(l.class.contains("seg_class") && l.predicate.contains("seg_i == seg_j"));
        let two = and(
            Mask::Segment { input: "a".into() },
            Mask::Segment { input: "b".into() },
        );
        let e = lower_mask(&two, &MaskNames::default(), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one segment input"), "{e}");
    }

    fn parse_mask(src: &str) -> mixc_dsl::ir::MixerSpec {
        mixc_dsl::parse_str(&format!(
            "mixer t {{ heads = 4; head_dim = 16; {src} score = dot(q, k); norm = softmax; }}"
        ))
        .unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    /// The softmax templates' names, with `i`, `j` that must not be used
    /// (a mask takes them from its `MaskNames`).
    fn env(spec: &mixc_dsl::ir::MixerSpec) -> LowerEnv<'_> {
        LowerEnv {
            i: "unused_i",
            j: "unused_j",
            ..crate::lower_softmax::lower_env(spec)
        }
    }

    #[test]
    fn expression_masks_are_bounded_and_keep_builtin_skips() {
        let spec = parse_mask("mask = causal && (i - j) % 4 == 0;");
        let mut hoisted = vec![];
        let exprs = MaskExprs {
            env: &env(&spec),
            hoisted: &mut hoisted,
        };
        let l = lower_mask_with(&spec.mask, &MaskNames::default(), Some(exprs), "t").unwrap();
        // `i`, `j` come from the mask names, not the expression environment.
        assert_eq!(
            l.predicate,
            "((pos_j <= pos_i) && (mixc::rem_or_zero((pos_i - pos_j), 4) == 0))"
        );
        // causal's closed form still skips the upper triangle; the
        // condition is bounded over the tile (mask.cuh's interval rules).
        assert_eq!(
            l.class,
            "mixc::class_and(mixc::class_causal(i0, i1, j0, j1), mixc::class_of_iv(\
             mixc::iv_eq(mixc::iv_rem(mixc::iv_sub(mixc::iv((double)i0, (double)i1), \
             mixc::iv((double)j0, (double)j1)), mixc::iv_pt((double)(4))), mixc::iv_pt((double)(0)))))"
        );
        assert_eq!(
            l.key_range,
            "mixc::range_intersect(mixc::range_causal(i0, i1), mixc::range_all())"
        );
        assert!(!l.all && l.segment_input.is_none() && hoisted.is_empty());
    }

    #[test]
    fn expression_masks_read_heads_batches_and_tables() {
        let spec = parse_mask(
            "input prefix: f32[batch]; mask = (j <= i && i - j < 8 * (h + 1)) || j < int(prefix[b]);",
        );
        assert!(matches!(spec.mask, Mask::Expr(_)), "{:?}", spec.mask);
        let mut hoisted = vec![];
        let exprs = MaskExprs {
            env: &env(&spec),
            hoisted: &mut hoisted,
        };
        let l = lower_mask_with(&spec.mask, &MaskNames::default(), Some(exprs), "t").unwrap();
        assert_eq!(
            l.predicate,
            "(((pos_j <= pos_i) && ((pos_i - pos_j) < (8 * (head + 1)))) || (pos_j < hoist0))"
        );
        // The head's window and the (hoisted) prefix are points per CTA.
        assert_eq!(
            l.class,
            "mixc::class_of_iv(mixc::iv_or(mixc::iv_and(mixc::iv_le(mixc::iv((double)j0, (double)j1), \
             mixc::iv((double)i0, (double)i1)), mixc::iv_lt(mixc::iv_sub(mixc::iv((double)i0, (double)i1), \
             mixc::iv((double)j0, (double)j1)), mixc::iv_pt((double)((8 * (head + 1)))))), \
             mixc::iv_lt(mixc::iv((double)j0, (double)j1), mixc::iv_pt((double)(hoist0)))))"
        );
        assert_eq!(l.key_range, "mixc::range_all()");
        // The table is read through its kernel parameter, once per CTA.
        assert_eq!(hoisted.len(), 1);
        assert_eq!(
            hoisted[0].code,
            "mixc::f2i(__ldg(in_prefix + mixc::clampi(batch_idx, gridDim.z)))"
        );
        // Without names for the expression's variables: a clear refusal.
        let e = lower_mask(&spec.mask, &MaskNames::default(), "t")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot generate") && e.contains("expression mask"),
            "{e}"
        );
    }

    #[test]
    fn huge_windows_saturate() {
        let l = lower_mask(&Mask::Window { size: u64::MAX }, &MaskNames::default(), "t").unwrap();
        assert!(l.predicate.contains(&i32::MAX.to_string()));
        let e = lower_mask(&Mask::Dilated { rate: 0 }, &MaskNames::default(), "t");
        assert!(e.is_err());
    }
}
