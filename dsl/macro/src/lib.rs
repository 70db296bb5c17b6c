//! `mixer!{}`: the .mix grammar checked at compile time.
//!
//! ```
//! let spec: mixc_dsl::MixerSpec = mixc_macro::mixer! {
//!     mixer llama {
//!         heads = 32;
//!         kv_heads = 8;
//!         head_dim = 128;
//!         mask = causal;
//!     }
//! };
//! assert_eq!(spec.group_size(), 4);
//! ```
//!
//! The tokens are validated by the same `mixc_dsl::parse_tokens` that reads
//! `.mix` files, so a spec written here equals the same spec in a file. Errors
//! become `compile_error!`s at the offending tokens. On success the macro
//! expands to a plain struct literal of the validated `MixerSpec` (no parsing
//! at run time); the calling crate must depend on `mixc-dsl`.

use mixc_dsl::*;
use proc_macro2::TokenStream;
use quote::{format_ident, quote};

#[proc_macro]
pub fn mixer(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    expand(input.into(), None).into()
}

/// `mixer_in!{ (PATH) spec... }`: [`mixer!`] with the IR types named through
/// `PATH` instead of `::mixc_dsl`, so a facade crate's `macro_rules!` wrapper
/// can pass `$crate::dsl` and its users need no dependency on `mixc-dsl`.
#[doc(hidden)]
#[proc_macro]
pub fn mixer_in(input: proc_macro::TokenStream) -> proc_macro::TokenStream {
    let mut it = TokenStream::from(input).into_iter();
    match it.next() {
        Some(proc_macro2::TokenTree::Group(g))
            if g.delimiter() == proc_macro2::Delimiter::Parenthesis =>
        {
            expand(it.collect(), Some(g.stream())).into()
        }
        _ => quote!(::core::compile_error!(
            "mixer_in!: expected `(path::to::dsl)` before the spec"
        ))
        .into(),
    }
}

/// The spec literal, or the diagnostics as `compile_error!`s; with `root`,
/// every `::mixc_dsl` path starts at `root` instead.
fn expand(input: TokenStream, root: Option<TokenStream>) -> TokenStream {
    let out = expand_at_mixc_dsl(input);
    match root {
        Some(root) => reroot(out, &root),
        None => out,
    }
}

/// Replaces each `:: mixc_dsl` in `ts` (at any depth) by `root`.
fn reroot(ts: TokenStream, root: &TokenStream) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let is_root = match (&toks[i], toks.get(i + 1), toks.get(i + 2)) {
            (TokenTree::Punct(a), Some(TokenTree::Punct(b)), Some(TokenTree::Ident(id))) => {
                a.as_char() == ':' && b.as_char() == ':' && id == "mixc_dsl"
            }
            _ => false,
        };
        if is_root {
            out.extend(root.clone());
            i += 3;
            continue;
        }
        match &toks[i] {
            TokenTree::Group(g) => {
                let mut ng = Group::new(g.delimiter(), reroot(g.stream(), root));
                ng.set_span(g.span());
                out.push(TokenTree::Group(ng));
            }
            t => out.push(t.clone()),
        }
        i += 1;
    }
    out.into_iter().collect()
}

fn expand_at_mixc_dsl(input: TokenStream) -> TokenStream {
    match parse_tokens(input) {
        Ok(spec) => spec_tokens(&spec),
        Err(diags) => {
            let errors = diags.to_compile_error();
            // Still an expression of type `MixerSpec` (via `!`), so the only
            // errors the user sees are ours.
            quote!({ #errors ::core::unreachable!() })
        }
    }
}

fn string(s: &str) -> TokenStream {
    quote!(::std::string::String::from(#s))
}

/// Floats travel as bit patterns: exact, whatever the value.
fn float(x: f64) -> TokenStream {
    let bits = x.to_bits();
    quote!(f64::from_bits(#bits))
}

fn spec_tokens(s: &MixerSpec) -> TokenStream {
    let name = string(&s.name);
    let (heads, kv_heads, head_dim, value_dim) = (s.heads, s.kv_heads, s.head_dim, s.value_dim);
    let dtype = match s.dtype {
        DType::F16 => quote!(F16),
        DType::Bf16 => quote!(Bf16),
        DType::F32 => quote!(F32),
    };
    let inputs = s.inputs.iter().map(input_tokens);
    let score = match &s.score {
        Score::Dot {
            q_map,
            k_map,
            scale,
        } => {
            let (q, k, scale) = (feature_map(*q_map), feature_map(*k_map), float(*scale));
            quote!(::mixc_dsl::Score::Dot { q_map: #q, k_map: #k, scale: #scale })
        }
        Score::Filter { input } => {
            let input = string(input);
            quote!(::mixc_dsl::Score::Filter { input: #input })
        }
    };
    let bias = option_expr(s.bias.as_ref());
    let transform = option_expr(s.transform.as_ref());
    let mask = mask_tokens(&s.mask);
    let decay = match &s.decay {
        Decay::None => quote!(::mixc_dsl::Decay::None),
        Decay::PerHead(e) => {
            let e = expr_tokens(e);
            quote!(::mixc_dsl::Decay::PerHead(#e))
        }
        Decay::Gate { input } => {
            let input = string(input);
            quote!(::mixc_dsl::Decay::Gate { input: #input })
        }
    };
    let norm = match s.norm {
        Norm::Softmax => quote!(::mixc_dsl::Norm::Softmax),
        Norm::Sum { eps } => {
            let eps = float(eps);
            quote!(::mixc_dsl::Norm::Sum { eps: #eps })
        }
        Norm::None => quote!(::mixc_dsl::Norm::None),
    };
    let family = match s.family {
        Family::Softmax => quote!(Softmax),
        Family::Linear => quote!(Linear),
        Family::Retention => quote!(Retention),
        Family::Gated => quote!(Gated),
        Family::Convolution => quote!(Convolution),
    };
    let default_scale = s.default_scale;
    quote! {
        ::mixc_dsl::MixerSpec {
            name: #name,
            heads: #heads,
            kv_heads: #kv_heads,
            head_dim: #head_dim,
            value_dim: #value_dim,
            dtype: ::mixc_dsl::DType::#dtype,
            inputs: ::std::vec![#(#inputs),*],
            score: #score,
            bias: #bias,
            transform: #transform,
            mask: #mask,
            decay: #decay,
            norm: #norm,
            family: ::mixc_dsl::Family::#family,
            default_scale: #default_scale,
        }
    }
}

fn input_tokens(d: &InputDecl) -> TokenStream {
    let name = string(&d.name);
    let elem = match d.elem {
        ElemType::F32 => quote!(F32),
        ElemType::I32 => quote!(I32),
    };
    let dims = d.dims.iter().map(|d| match d {
        Dim::Batch => quote!(::mixc_dsl::Dim::Batch),
        Dim::Seq => quote!(::mixc_dsl::Dim::Seq),
        Dim::Heads => quote!(::mixc_dsl::Dim::Heads),
        Dim::KvHeads => quote!(::mixc_dsl::Dim::KvHeads),
        Dim::Fixed(n) => quote!(::mixc_dsl::Dim::Fixed(#n)),
    });
    let role = match d.role {
        InputRole::SegmentIds => quote!(SegmentIds),
        InputRole::Gate => quote!(Gate),
        InputRole::Filter => quote!(Filter),
        InputRole::Table => quote!(Table),
    };
    quote! {
        ::mixc_dsl::InputDecl {
            name: #name,
            elem: ::mixc_dsl::ElemType::#elem,
            dims: ::std::vec![#(#dims),*],
            role: ::mixc_dsl::InputRole::#role,
        }
    }
}

fn feature_map(m: FeatureMap) -> TokenStream {
    match m {
        FeatureMap::Identity => quote!(::mixc_dsl::FeatureMap::Identity),
        FeatureMap::Elu1 => quote!(::mixc_dsl::FeatureMap::Elu1),
        FeatureMap::Relu => quote!(::mixc_dsl::FeatureMap::Relu),
    }
}

fn option_expr(e: Option<&Expr>) -> TokenStream {
    match e {
        Some(e) => {
            let e = expr_tokens(e);
            quote!(::std::option::Option::Some(#e))
        }
        None => quote!(::std::option::Option::None),
    }
}

fn expr_tokens(e: &Expr) -> TokenStream {
    match e {
        Expr::Int(v) => quote!(::mixc_dsl::Expr::Int(#v)),
        Expr::Float(v) => {
            let v = float(*v);
            quote!(::mixc_dsl::Expr::Float(#v))
        }
        // Unit variants print as their own names.
        Expr::Var(v) => {
            let v = format_ident!("{v:?}");
            quote!(::mixc_dsl::Expr::Var(::mixc_dsl::Var::#v))
        }
        Expr::Unary(op, a) => {
            let (op, a) = (format_ident!("{op:?}"), expr_tokens(a));
            quote!(::mixc_dsl::Expr::Unary(::mixc_dsl::UnOp::#op, ::std::boxed::Box::new(#a)))
        }
        Expr::Binary(op, a, b) => {
            let op = format_ident!("{op:?}");
            let (a, b) = (expr_tokens(a), expr_tokens(b));
            quote!(::mixc_dsl::Expr::Binary(
                ::mixc_dsl::BinOp::#op,
                ::std::boxed::Box::new(#a),
                ::std::boxed::Box::new(#b)
            ))
        }
        Expr::Call(f, args) => {
            let f = format_ident!("{f:?}");
            let args = args.iter().map(expr_tokens);
            quote!(::mixc_dsl::Expr::Call(::mixc_dsl::Func::#f, ::std::vec![#(#args),*]))
        }
        Expr::Index { input, indices } => {
            let input = string(input);
            let indices = indices.iter().map(expr_tokens);
            quote!(::mixc_dsl::Expr::Index { input: #input, indices: ::std::vec![#(#indices),*] })
        }
    }
}

fn mask_tokens(m: &Mask) -> TokenStream {
    match m {
        Mask::All => quote!(::mixc_dsl::Mask::All),
        Mask::Causal => quote!(::mixc_dsl::Mask::Causal),
        Mask::Expr(e) => {
            let e = expr_tokens(e);
            quote!(::mixc_dsl::Mask::Expr(#e))
        }
        Mask::Window { size } => quote!(::mixc_dsl::Mask::Window { size: #size }),
        Mask::PrefixLm { prefix } => quote!(::mixc_dsl::Mask::PrefixLm { prefix: #prefix }),
        Mask::Segment { input } => {
            let input = string(input);
            quote!(::mixc_dsl::Mask::Segment { input: #input })
        }
        Mask::BlockSparse {
            block,
            local,
            global,
        } => {
            quote!(::mixc_dsl::Mask::BlockSparse { block: #block, local: #local, global: #global })
        }
        Mask::Dilated { rate } => quote!(::mixc_dsl::Mask::Dilated { rate: #rate }),
        Mask::And(a, b) => {
            let (a, b) = (mask_tokens(a), mask_tokens(b));
            quote!(::mixc_dsl::Mask::And(::std::boxed::Box::new(#a), ::std::boxed::Box::new(#b)))
        }
        Mask::Or(a, b) => {
            let (a, b) = (mask_tokens(a), mask_tokens(b));
            quote!(::mixc_dsl::Mask::Or(::std::boxed::Box::new(#a), ::std::boxed::Box::new(#b)))
        }
    }
}
