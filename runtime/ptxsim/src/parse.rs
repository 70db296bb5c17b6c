//! PTX text → [`Module`]: the subset NVRTC emits for mixc's kernels
//! (module variables, `.entry` functions with `.reg`/`.shared` declarations,
//! scoped inline-asm blocks, predicated instructions). Anything else is an
//! error naming the line, never a silent skip.

use std::collections::HashMap;

use super::{Inst, Kernel, Module, Op, Operand, SimError, Special, Ty, Var};

/// A token of PTX text, with its 1-based line.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// Identifiers, opcodes (with their dots), registers, directives, numbers.
    Word(String),
    Punct(char),
}

fn lex(src: &str) -> Result<Vec<(Tok, u32)>, SimError> {
    let mut out = Vec::new();
    let b = src.as_bytes();
    let (mut i, mut line) = (0usize, 1u32);
    while i < b.len() {
        let c = b[i] as char;
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if src[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if src[i..].starts_with("/*") {
            let end = src[i + 2..]
                .find("*/")
                .ok_or_else(|| SimError::parse(line, "unterminated comment"))?;
            line += src[i..i + 2 + end].matches('\n').count() as u32;
            i += end + 4;
        } else if c.is_ascii_alphanumeric() || "._$%".contains(c) {
            let s = i;
            while i < b.len()
                && ((b[i] as char).is_ascii_alphanumeric() || "._$%:".contains(b[i] as char))
            {
                // `::` belongs to cache-policy modifiers (`.L1::no_allocate`);
                // a single `:` ends a label.
                if b[i] == b':' {
                    if i + 1 < b.len() && b[i + 1] == b':' {
                        i += 2;
                        continue;
                    }
                    break;
                }
                i += 1;
            }
            out.push((Tok::Word(src[s..i].to_string()), line));
        } else if c == '"' {
            // Only `.pragma "..."` uses strings; kept as one word.
            let end = src[i + 1..]
                .find('"')
                .ok_or_else(|| SimError::parse(line, "unterminated string"))?;
            out.push((Tok::Word(src[i..i + end + 2].to_string()), line));
            i += end + 2;
        } else if ",;:{}[]()+-|!@<>=".contains(c) {
            out.push((Tok::Punct(c), line));
            i += 1;
        } else {
            return Err(SimError::parse(line, format!("unexpected character `{c}`")));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, u32)>,
    pos: usize,
}

impl Parser {
    fn line(&self) -> u32 {
        self.toks
            .get(self.pos)
            .or(self.toks.last())
            .map_or(0, |t| t.1)
    }
    fn err(&self, msg: impl Into<String>) -> SimError {
        SimError::parse(self.line(), msg)
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.pos + k).map(|t| &t.0)
    }
    fn next(&mut self) -> Result<Tok, SimError> {
        let t = self
            .toks
            .get(self.pos)
            .map(|t| t.0.clone())
            .ok_or_else(|| self.err("unexpected end of PTX"))?;
        self.pos += 1;
        Ok(t)
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: char) -> Result<(), SimError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("expected `{c}`, found {:?}", self.peek())))
        }
    }
    fn word(&mut self) -> Result<String, SimError> {
        match self.next()? {
            Tok::Word(w) => Ok(w),
            t => Err(self.err(format!("expected a word, found {t:?}"))),
        }
    }
    /// Skips the rest of the current line (directives without a `;`).
    fn skip_line(&mut self) {
        let l0 = self.toks[self.pos - 1].1;
        while self.peek().is_some() && self.toks[self.pos].1 == l0 {
            self.pos += 1;
        }
    }
    /// Skips to just past the next `;` (directives the simulator ignores).
    fn skip_statement(&mut self) -> Result<(), SimError> {
        while !self.eat(';') {
            self.next()?;
        }
        Ok(())
    }
}

/// Parses an integer literal (decimal, hex `0x..`, octal-free) with an
/// optional `U` suffix.
fn int_lit(w: &str) -> Option<u64> {
    let w = w.trim_end_matches('U');
    if let Some(h) = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty() {
        w.parse().ok()
    } else {
        None
    }
}

/// Literal bits: `0fXXXXXXXX` (f32), `0dXXXXXXXXXXXXXXXX` (f64), integers,
/// and decimal floats (stored as f64 bits, converted at use by the type).
fn literal(w: &str, neg: bool) -> Option<Operand> {
    if let Some(h) = w.strip_prefix("0f").or_else(|| w.strip_prefix("0F")) {
        let bits = u32::from_str_radix(h, 16).ok()?;
        let v = f32::from_bits(bits);
        return Some(Operand::F32(if neg { -v } else { v }));
    }
    if let Some(h) = w.strip_prefix("0d").or_else(|| w.strip_prefix("0D")) {
        let v = f64::from_bits(u64::from_str_radix(h, 16).ok()?);
        return Some(Operand::F64(if neg { -v } else { v }));
    }
    if let Some(v) = int_lit(w) {
        return Some(Operand::Imm(if neg { v.wrapping_neg() } else { v }));
    }
    if w.contains('.') && w.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        let v: f64 = w.parse().ok()?;
        return Some(Operand::F64(if neg { -v } else { v }));
    }
    None
}

/// Register scopes: `{ .reg .pred %p1; ... }` in inline asm shadows the
/// function's `%p1`, so names resolve innermost first.
struct Regs {
    scopes: Vec<HashMap<String, u32>>,
    count: u32,
    types: Vec<Ty>,
}

impl Regs {
    fn declare(&mut self, name: String, ty: Ty) {
        self.scopes.last_mut().unwrap().insert(name, self.count);
        self.types.push(ty);
        self.count += 1;
    }
    fn get(&self, name: &str) -> Option<u32> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }
}

fn special(w: &str) -> Option<Special> {
    Some(match w {
        "%tid.x" => Special::Tid(0),
        "%tid.y" => Special::Tid(1),
        "%tid.z" => Special::Tid(2),
        "%ntid.x" => Special::Ntid(0),
        "%ntid.y" => Special::Ntid(1),
        "%ntid.z" => Special::Ntid(2),
        "%ctaid.x" => Special::Ctaid(0),
        "%ctaid.y" => Special::Ctaid(1),
        "%ctaid.z" => Special::Ctaid(2),
        "%nctaid.x" => Special::Nctaid(0),
        "%nctaid.y" => Special::Nctaid(1),
        "%nctaid.z" => Special::Nctaid(2),
        "%laneid" => Special::Laneid,
        "%warpid" => Special::Warpid,
        _ => return None,
    })
}

struct FnCtx<'a> {
    regs: Regs,
    /// Function-local `.shared` variables and the module's variables.
    symbols: &'a HashMap<String, u32>,
    local_shared: HashMap<String, u32>,
    params: &'a HashMap<String, u32>,
    labels: &'a mut HashMap<String, usize>,
    label_refs: Vec<(usize, usize, String, u32)>,
}

impl Parser {
    /// `.align N` `.TYPE` NAME [`[N]`] [= init] `;` after the state space word.
    fn variable(&mut self, space: &str) -> Result<Var, SimError> {
        let mut align = 1u32;
        let mut elem = 1u32;
        loop {
            let w = self.word()?;
            if w == ".align" {
                let n = self.word()?;
                align = int_lit(&n).ok_or_else(|| self.err("bad .align"))? as u32;
            } else if let Some(t) = Ty::parse(&w) {
                elem = t.bytes().max(1);
            } else if w.starts_with('.') {
                continue; // .v2 etc. are not emitted for variables; other qualifiers ignored
            } else {
                let mut count = 1u64;
                let mut unsized_ = false;
                if self.eat('[') {
                    if self.eat(']') {
                        unsized_ = true;
                        count = 0;
                    } else {
                        let n = self.word()?;
                        count = int_lit(&n).ok_or_else(|| self.err("bad array size"))?;
                        self.expect(']')?;
                    }
                }
                let size = (count * elem as u64) as usize;
                let mut init = vec![0u8; size];
                if self.eat('=') {
                    let mut vals = Vec::new();
                    if self.eat('{') {
                        while !self.eat('}') {
                            let neg = self.eat('-');
                            let w = self.word()?;
                            vals.push(literal(&w, neg).ok_or_else(|| self.err("bad initialiser"))?);
                            self.eat(',');
                        }
                    } else {
                        let neg = self.eat('-');
                        let w = self.word()?;
                        vals.push(literal(&w, neg).ok_or_else(|| self.err("bad initialiser"))?);
                    }
                    for (k, v) in vals.iter().enumerate() {
                        let bits = match *v {
                            Operand::Imm(b) => b,
                            Operand::F32(f) => f.to_bits() as u64,
                            Operand::F64(f) if elem == 4 => (f as f32).to_bits() as u64,
                            Operand::F64(f) => f.to_bits(),
                            _ => unreachable!(),
                        };
                        let at = k * elem as usize;
                        if at + elem as usize > init.len() {
                            return Err(self.err("initialiser longer than the variable"));
                        }
                        init[at..at + elem as usize]
                            .copy_from_slice(&bits.to_le_bytes()[..elem as usize]);
                    }
                }
                self.expect(';')?;
                return Ok(Var {
                    name: w,
                    space: space.to_string(),
                    align,
                    size,
                    unsized_,
                    init,
                });
            }
        }
    }

    fn operand(&mut self, f: &mut FnCtx) -> Result<Operand, SimError> {
        if self.eat('{') {
            let mut v = Vec::new();
            while !self.eat('}') {
                v.push(self.operand(f)?);
                self.eat(',');
            }
            return Ok(Operand::Vec(v));
        }
        if self.eat('[') {
            let (mut base, mut off) = (None, 0i64);
            if !self.is_punct('-') {
                let w = self.word()?;
                if let Some(v) = int_lit(&w) {
                    off = v as i64;
                } else {
                    base = Some(Box::new(self.name_operand(f, &w)?));
                }
            }
            while !self.eat(']') {
                let neg = if self.eat('+') {
                    self.eat('-')
                } else {
                    self.expect('-')?;
                    true
                };
                let w = self.word()?;
                let v = int_lit(&w).ok_or_else(|| self.err("bad address offset"))? as i64;
                off += if neg { -v } else { v };
            }
            return Ok(Operand::Addr { base, off });
        }
        if self.eat('!') {
            let w = self.word()?;
            let r = f
                .regs
                .get(&w)
                .ok_or_else(|| self.err(format!("unknown register {w}")))?;
            return Ok(Operand::NotPred(r));
        }
        let neg = self.eat('-');
        let w = self.word()?;
        if let Some(l) = literal(&w, neg) {
            return Ok(l);
        }
        if neg {
            return Err(self.err("`-` before a non-literal"));
        }
        let first = self.name_operand(f, &w)?;
        if self.eat('|') {
            let w2 = self.word()?;
            let second = self.name_operand(f, &w2)?;
            return Ok(Operand::Vec(vec![first, second]));
        }
        Ok(first)
    }

    fn name_operand(&mut self, f: &mut FnCtx, w: &str) -> Result<Operand, SimError> {
        if w == "_" {
            return Ok(Operand::Sink);
        }
        if let Some(r) = f.regs.get(w) {
            return Ok(Operand::Reg(r));
        }
        if let Some(s) = special(w) {
            return Ok(Operand::Special(s));
        }
        if let Some(&p) = f.params.get(w) {
            return Ok(Operand::Param(p));
        }
        if let Some(&s) = f.local_shared.get(w).or_else(|| f.symbols.get(w)) {
            return Ok(Operand::Sym(s));
        }
        if w.starts_with('$') || w.starts_with("L__") {
            return Ok(Operand::Label(usize::MAX)); // resolved by the caller
        }
        Err(self.err(format!("unknown name `{w}`")))
    }

    fn function(
        &mut self,
        vars: &mut Vec<Var>,
        symbols: &HashMap<String, u32>,
    ) -> Result<Kernel, SimError> {
        let name = self.word()?;
        let mut params = Vec::new();
        let mut param_ids = HashMap::new();
        self.expect('(')?;
        while !self.eat(')') {
            let w = self.word()?;
            if w != ".param" {
                return Err(self.err(format!("expected .param, found {w}")));
            }
            let mut bytes = 0u32;
            let pname = loop {
                let w = self.word()?;
                if let Some(t) = Ty::parse(&w) {
                    bytes = t.bytes();
                } else if w == ".align" || w.starts_with('.') {
                    if w == ".align" {
                        self.word()?;
                    }
                } else {
                    break w;
                }
            };
            if self.eat('[') {
                return Err(self.err("array parameters are not supported by the simulator"));
            }
            param_ids.insert(pname.clone(), params.len() as u32);
            params.push((pname, bytes));
            self.eat(',');
        }
        // Performance directives up to the body.
        while !self.is_punct('{') {
            self.next()?;
        }
        self.expect('{')?;
        let mut labels = HashMap::new();
        let mut code: Vec<Inst> = Vec::new();
        let mut ctx = FnCtx {
            regs: Regs {
                scopes: vec![HashMap::new()],
                count: 0,
                types: Vec::new(),
            },
            symbols,
            local_shared: HashMap::new(),
            params: &param_ids,
            labels: &mut labels,
            label_refs: Vec::new(),
        };
        let mut depth = 1;
        let (mut src_line, mut src_lines) = (0u32, Vec::new());
        while depth > 0 {
            let line = self.line();
            match self.next()? {
                Tok::Punct('{') => {
                    depth += 1;
                    ctx.regs.scopes.push(HashMap::new());
                }
                Tok::Punct('}') => {
                    depth -= 1;
                    ctx.regs.scopes.pop();
                }
                Tok::Word(w) if self.is_punct(':') => {
                    self.pos += 1;
                    ctx.labels.insert(w, code.len());
                }
                Tok::Word(w) if w == ".reg" => {
                    let ty = loop {
                        let t = self.word()?;
                        if let Some(t) = Ty::parse(&t) {
                            break t;
                        }
                    };
                    loop {
                        let r = self.word()?;
                        if self.eat('<') {
                            let n = self.word()?;
                            let n = int_lit(&n).ok_or_else(|| self.err("bad register count"))?;
                            self.expect('>')?;
                            for k in 0..n {
                                ctx.regs.declare(format!("{r}{k}"), ty);
                            }
                        } else {
                            ctx.regs.declare(r, ty);
                        }
                        if !self.eat(',') {
                            break;
                        }
                    }
                    self.expect(';')?;
                }
                Tok::Word(w) if w == ".shared" => {
                    let v = self.variable(".shared")?;
                    ctx.local_shared.insert(v.name.clone(), vars.len() as u32);
                    vars.push(v);
                }
                Tok::Word(w) if w == ".local" || w == ".param" => {
                    return Err(SimError::parse(
                        line,
                        format!("`{w}` variables (stack frames, calls) are not supported by the simulator"),
                    ));
                }
                Tok::Word(w) if w == ".loc" => {
                    // `.loc FILE LINE COL[, function_name .., inlined_at ..]`:
                    // the innermost source line of what follows.
                    if let (Some(Tok::Word(_)), Some(Tok::Word(l))) = (self.peek(), self.peek_at(1))
                    {
                        src_line = int_lit(l).unwrap_or(0) as u32;
                    }
                    self.skip_line();
                }
                Tok::Word(w) if w.starts_with('.') => self.skip_statement()?,
                Tok::Punct('@') => {
                    let neg = self.eat('!');
                    let p = self.word()?;
                    let r = ctx
                        .regs
                        .get(&p)
                        .ok_or_else(|| self.err(format!("unknown predicate {p}")))?;
                    let op = self.word()?;
                    let mut inst = self.instruction(&mut ctx, &op, line, code.len())?;
                    inst.guard = Some((r, neg));
                    code.push(inst);
                    src_lines.push(src_line);
                }
                Tok::Word(op) => {
                    let inst = self.instruction(&mut ctx, &op, line, code.len())?;
                    code.push(inst);
                    src_lines.push(src_line);
                }
                t => return Err(SimError::parse(line, format!("unexpected {t:?}"))),
            }
        }
        for (inst, k, label, line) in std::mem::take(&mut ctx.label_refs) {
            let target = *ctx
                .labels
                .get(&label)
                .ok_or_else(|| SimError::parse(line, format!("unknown label {label}")))?;
            if let Operand::Label(t) = &mut code[inst].ops[k] {
                *t = target;
            }
        }
        let reg_types = ctx.regs.types;
        Ok(Kernel {
            name,
            params,
            nregs: reg_types.len(),
            reg_types,
            code,
            src_lines,
        })
    }

    fn instruction(
        &mut self,
        f: &mut FnCtx,
        opcode: &str,
        line: u32,
        at: usize,
    ) -> Result<Inst, SimError> {
        let op = Op::parse(opcode).map_err(|m| SimError::parse(line, m))?;
        let mut ops = Vec::new();
        let mut label_names = Vec::new();
        while !self.eat(';') {
            if let Some(Tok::Word(w)) = self.peek() {
                if (w.starts_with('$') || w.starts_with("L__")) && f.regs.get(w).is_none() {
                    let w = w.clone();
                    self.pos += 1;
                    label_names.push((ops.len(), w));
                    ops.push(Operand::Label(usize::MAX));
                    self.eat(',');
                    continue;
                }
            }
            ops.push(self.operand(f)?);
            if !self.eat(',') && !self.is_punct(';') {
                return Err(self.err(format!("expected `,` or `;` after an operand of {opcode}")));
            }
        }
        let need = op.min_operands();
        if ops.len() < need {
            return Err(SimError::parse(
                line,
                format!("`{opcode}` takes {need} operands, found {}", ops.len()),
            ));
        }
        for (k, w) in label_names {
            f.label_refs.push((at, k, w, line));
        }
        Ok(Inst {
            guard: None,
            op,
            ops,
            line,
        })
    }
}

/// Parses a whole PTX module.
pub fn parse(src: &str) -> Result<Module, SimError> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
    };
    let mut vars: Vec<Var> = Vec::new();
    let mut symbols: HashMap<String, u32> = HashMap::new();
    let mut kernels = Vec::new();
    while p.peek().is_some() {
        let w = p.word()?;
        match w.as_str() {
            ".version" | ".target" | ".address_size" | ".file" => p.skip_line(),
            ".section" => {
                // Debug sections (`-lineinfo`): a name and a braced body.
                while !p.eat('{') {
                    p.next()?;
                }
                let mut depth = 1;
                while depth > 0 {
                    match p.next()? {
                        Tok::Punct('{') => depth += 1,
                        Tok::Punct('}') => depth -= 1,
                        _ => {}
                    }
                }
            }
            ".visible" | ".weak" | ".extern" => {
                // A linkage word before a variable or an entry.
                match p.peek_at(0) {
                    Some(Tok::Word(n)) if n == ".entry" => {
                        p.pos += 1;
                        let k = p.function(&mut vars, &symbols)?;
                        kernels.push(k);
                    }
                    Some(Tok::Word(n)) if n == ".func" => {
                        return Err(
                            p.err("device functions (`.func`) are not supported by the simulator")
                        );
                    }
                    Some(Tok::Word(n))
                        if [".shared", ".global", ".const"].contains(&n.as_str()) =>
                    {
                        let space = p.word()?;
                        let v = p.variable(&space)?;
                        symbols.insert(v.name.clone(), vars.len() as u32);
                        vars.push(v);
                    }
                    t => return Err(p.err(format!("unexpected {t:?} after {w}"))),
                }
            }
            ".entry" => {
                let k = p.function(&mut vars, &symbols)?;
                kernels.push(k);
            }
            ".func" => {
                return Err(p.err("device functions (`.func`) are not supported by the simulator"))
            }
            ".shared" | ".global" | ".const" => {
                let v = p.variable(&w)?;
                symbols.insert(v.name.clone(), vars.len() as u32);
                vars.push(v);
            }
            _ => return Err(p.err(format!("unexpected `{w}` at module level"))),
        }
    }
    Ok(Module { vars, kernels })
}
