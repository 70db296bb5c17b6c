//! Unit tests of the PTX simulator: small hand-written kernels with known
//! answers (arithmetic, conversions, special registers, memory spaces, warp
//! collectives against the PTX ISA fragment layouts, barriers, races,
//! `cp.async`, bounds) and the errors it must report instead of panicking
//! or hanging.

use half::{bf16, f16};

use super::{GlobalMemory, LaunchStats, Module, SimError};

const HEADER: &str = ".version 8.0\n.target sm_80\n.address_size 64\n\n";

/// Register files every generated test kernel declares.
const REGS: &str = "\t.reg .pred %p<32>;\n\t.reg .b16 %rs<32>;\n\t.reg .b32 %r<96>;\n\t\
                    .reg .f32 %f<64>;\n\t.reg .b64 %rd<64>;\n\t.reg .f64 %fd<16>;\n";

const SENTINEL: u32 = 0xdead_beef;

/// Global memory of the tests: buffer `i` lives at `(i + 1) << 32`;
/// anything outside a buffer is an error.
#[derive(Default)]
struct Mem {
    bufs: Vec<Vec<u8>>,
}

impl Mem {
    fn add(&mut self, data: Vec<u8>) -> u64 {
        self.bufs.push(data);
        (self.bufs.len() as u64) << 32
    }
    fn words(&mut self, v: &[u32]) -> u64 {
        self.add(v.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
    fn floats(&mut self, v: &[f32]) -> u64 {
        self.add(v.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
    /// `n` words of [`SENTINEL`]: what a kernel did not write shows.
    fn out(&mut self, n: usize) -> u64 {
        self.words(&vec![SENTINEL; n])
    }
    fn locate(&self, addr: u64, len: usize) -> Result<(usize, usize), String> {
        let id = (addr >> 32) as usize;
        let buf = id
            .checked_sub(1)
            .and_then(|i| self.bufs.get(i))
            .ok_or_else(|| format!("unmapped address {addr:#x}"))?;
        let off = (addr & 0xffff_ffff) as usize;
        if off + len > buf.len() {
            return Err(format!(
                "access {off}..{} outside a {}-byte buffer",
                off + len,
                buf.len()
            ));
        }
        Ok((id - 1, off))
    }
    fn bytes(&self, addr: u64) -> &[u8] {
        let (i, off) = self.locate(addr, 0).unwrap();
        &self.bufs[i][off..]
    }
    fn u32s(&self, addr: u64) -> Vec<u32> {
        self.bytes(addr)
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn f32s(&self, addr: u64) -> Vec<f32> {
        self.u32s(addr).into_iter().map(f32::from_bits).collect()
    }
}

impl GlobalMemory for Mem {
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), String> {
        let (i, off) = self.locate(addr, out.len())?;
        out.copy_from_slice(&self.bufs[i][off..off + out.len()]);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        let (i, off) = self.locate(addr, data.len())?;
        self.bufs[i][off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn alloc(&mut self, data: Vec<u8>) -> u64 {
        self.add(data)
    }
}

/// A module: `vars` at module level, then kernel `k` with `nparams` `.u64`
/// parameters loaded into `%rd1..`, the standard registers, and `body`.
fn module(vars: &str, nparams: usize, body: &str) -> String {
    let params: Vec<String> = (0..nparams)
        .map(|i| format!(".param .u64 k_param_{i}"))
        .collect();
    let loads: String = (0..nparams)
        .map(|i| format!("\tld.param.u64 %rd{}, [k_param_{i}];\n", i + 1))
        .collect();
    format!(
        "{HEADER}{vars}\n.visible .entry k({})\n{{\n{REGS}{loads}{body}\n\tret;\n}}\n",
        params.join(", ")
    )
}

fn parse(src: &str) -> Module {
    Module::parse(src).unwrap_or_else(|e| panic!("{e}\n{src}"))
}

fn launch(
    src: &str,
    mem: &mut Mem,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    params: &[u64],
) -> Result<LaunchStats, SimError> {
    parse(src).launch(mem, "k", grid, block, smem, params)
}

/// Launches `k` over `grid` x `block` threads (1-D) and expects success.
fn ok(src: &str, mem: &mut Mem, grid: u32, block: u32, smem: u32, params: &[u64]) -> LaunchStats {
    launch(src, mem, (grid, 1, 1), (block, 1, 1), smem, params)
        .unwrap_or_else(|e| panic!("{e}\n{src}"))
}

/// Launches `k` and expects an error.
fn fails(src: &str, mem: &mut Mem, grid: u32, block: u32, smem: u32, params: &[u64]) -> SimError {
    match launch(src, mem, (grid, 1, 1), (block, 1, 1), smem, params) {
        Ok(_) => panic!("expected an error from\n{src}"),
        Err(e) => e,
    }
}

fn assert_msg(e: &SimError, needle: &str) {
    assert!(
        e.msg.contains(needle),
        "expected an error mentioning {needle:?}, got: {e}"
    );
}

/// 1-based line of the first line of `src` containing `needle`.
fn line_of(src: &str, needle: &str) -> u32 {
    src.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the source")) as u32
        + 1
}

/// `st.global.u32 [base+4k], reg_k;` for each register.
fn store_words(base: &str, regs: &[&str]) -> String {
    regs.iter()
        .enumerate()
        .map(|(k, r)| format!("\tst.global.u32 [{base}+{}], {r};\n", 4 * k))
        .collect()
}

/// Sets `%rd40` to `out + 4 * per_thread * (global thread id)` (1-D launch, `%rd1` = out).
fn thread_slot(per_thread: u32) -> String {
    format!(
        "\tmov.u32 %r90, %tid.x;\n\tmov.u32 %r91, %ctaid.x;\n\tmov.u32 %r92, %ntid.x;\n\
         \tmad.lo.u32 %r93, %r91, %r92, %r90;\n\tmul.wide.u32 %rd41, %r93, {};\n\
         \tadd.s64 %rd40, %rd1, %rd41;\n",
        4 * per_thread
    )
}

// ---- scalar instructions ---------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Want {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Nan,
    Pred(bool),
}

/// Runs one thread executing `prelude`, then each case's code (which writes
/// `%r10`, `%rd10`, `%f10` or `%p10` by the kind of its answer, reset to a
/// sentinel before), storing each result; checks every answer.
fn run_cases(prelude: &str, cases: &[(&str, Want)]) {
    let mut body = String::from(prelude);
    for (i, (code, want)) in cases.iter().enumerate() {
        let off = 8 * i;
        let (reset, store) = match want {
            Want::U32(_) | Want::I32(_) => (
                "mov.b32 %r10, 0xdeadbeef;".to_string(),
                format!("st.global.u32 [%rd1+{off}], %r10;"),
            ),
            Want::U64(_) => (
                "mov.b64 %rd10, 0xdeadbeefdeadbeef;".to_string(),
                format!("st.global.u64 [%rd1+{off}], %rd10;"),
            ),
            Want::F32(_) | Want::Nan => (
                "mov.b32 %f10, 0xdeadbeef;".to_string(),
                format!("st.global.f32 [%rd1+{off}], %f10;"),
            ),
            Want::Pred(p) => (
                // The opposite of the answer.
                format!("setp.eq.u32 %p10, 0, {};", *p as u32),
                format!("selp.u32 %r10, 1, 0, %p10;\n\tst.global.u32 [%rd1+{off}], %r10;"),
            ),
        };
        body += &format!("\t// case {i}\n\t{reset}\n\t{code}\n\t{store}\n");
    }
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let out = mem.add(vec![0xaa; 8 * cases.len()]);
    ok(&src, &mut mem, 1, 1, 0, &[out]);
    let bytes = mem.bytes(out);
    let mut bad = Vec::new();
    for (i, (code, want)) in cases.iter().enumerate() {
        let slot = &bytes[8 * i..8 * i + 8];
        let w32 = u32::from_le_bytes(slot[..4].try_into().unwrap());
        let w64 = u64::from_le_bytes(slot.try_into().unwrap());
        let good = match *want {
            Want::U32(v) => w32 == v,
            Want::I32(v) => w32 == v as u32,
            Want::U64(v) => w64 == v,
            Want::F32(v) => w32 == v.to_bits(),
            Want::Nan => f32::from_bits(w32).is_nan(),
            Want::Pred(p) => w32 == p as u32,
        };
        if !good {
            bad.push(format!(
                "case {i} `{code}`: want {want:?}, got {w32:#010x} ({} / {w64:#x})",
                f32::from_bits(w32)
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

const INT_PRELUDE: &str = "\
\tmov.u32 %r1, 7;
\tmov.u32 %r2, -3;
\tmov.u32 %r3, 0xffff0000;
\tmov.u32 %r4, 0xabcd1234;
\tmov.u32 %r5, 300;
\tmov.u32 %r6, 40000;
\tmov.b64 %rd20, 0x100000005;
\tmov.u64 %rd21, -8;
\tmov.b16 %rs1, 0x1111;
\tmov.b16 %rs2, 0x2222;
\tmov.b16 %rs7, 0x8001;
\tsetp.lt.s32 %p1, %r2, %r1;
\tsetp.lt.u32 %p2, %r2, %r1;
";

#[test]
fn integer_arithmetic() {
    use Want::*;
    run_cases(
        INT_PRELUDE,
        &[
            ("add.s32 %r10, %r1, %r2;", I32(4)),
            ("add.s32 %r10, %r1, -10;", I32(-3)),
            ("sub.s32 %r10, %r2, %r1;", I32(-10)),
            ("mul.lo.s32 %r10, %r2, %r1;", I32(-21)),
            ("mul.lo.u32 %r10, %r4, 16;", U32(0xbcd1_2340)),
            ("mul.hi.s32 %r10, %r2, %r1;", U32(0xffff_ffff)),
            ("mul.hi.u32 %r10, %r2, %r1;", U32(6)),
            ("mad.lo.s32 %r10, %r1, %r1, %r2;", I32(46)),
            ("mad.lo.s32 %r10, %r2, %r1, -100;", I32(-121)),
            ("div.s32 %r10, %r2, 2;", I32(-1)),
            ("rem.s32 %r10, %r2, 2;", I32(-1)),
            ("div.u32 %r10, %r2, 2;", U32(0x7fff_fffe)),
            ("rem.u32 %r10, %r2, 10;", U32(3)),
            ("shr.s32 %r10, %r2, 1;", I32(-2)),
            ("shr.u32 %r10, %r2, 1;", U32(0x7fff_fffe)),
            ("shr.s32 %r10, %r2, 40;", I32(-1)),
            ("shr.u32 %r10, %r2, 40;", U32(0)),
            ("shr.s32 %r10, %r4, 4;", U32(0xfabc_d123)),
            ("shr.b32 %r10, %r4, 4;", U32(0x0abc_d123)),
            ("shl.b32 %r10, %r1, 29;", U32(0xe000_0000)),
            ("shl.b32 %r10, %r1, 32;", U32(0)),
            ("bfi.b32 %r10, 5, %r3, 4, 3;", U32(0xffff_0050)),
            ("bfi.b32 %r10, %r4, 0, 8, 8;", U32(0x3400)),
            ("bfi.b32 %r10, %r4, %r3, 0, 0;", U32(0xffff_0000)),
            ("bfe.u32 %r10, %r4, 8, 8;", U32(0x12)),
            ("bfe.s32 %r10, %r4, 28, 4;", I32(-6)),
            ("min.s32 %r10, %r1, %r2;", I32(-3)),
            ("min.u32 %r10, %r1, %r2;", U32(7)),
            ("max.s32 %r10, %r1, %r2;", I32(7)),
            ("max.u32 %r10, %r1, %r2;", U32(0xffff_fffd)),
            ("min.s32 %r10, %r2, -5;", I32(-5)),
            ("and.b32 %r10, %r4, 0xff;", U32(0x34)),
            ("or.b32 %r10, %r4, 0xf;", U32(0xabcd_123f)),
            ("xor.b32 %r10, %r4, %r4;", U32(0)),
            ("not.b32 %r10, %r4;", U32(0x5432_edcb)),
            ("popc.b32 %r10, %r3;", U32(16)),
            ("popc.b64 %r10, %rd20;", U32(3)),
            ("clz.b32 %r10, %r1;", U32(29)),
            ("clz.b64 %r10, %rd20;", U32(31)),
            ("abs.s32 %r10, %r2;", U32(3)),
            ("neg.s32 %r10, %r1;", I32(-7)),
            ("selp.b32 %r10, %r1, %r2, %p1;", U32(7)),
            ("selp.u32 %r10, 100, 200, %p2;", U32(200)),
            ("mov.u32 %r10, %r4;", U32(0xabcd_1234)),
        ],
    );
}

#[test]
fn integer_arithmetic_64_bit() {
    use Want::*;
    run_cases(
        INT_PRELUDE,
        &[
            ("mul.wide.s32 %rd10, %r2, %r1;", U64(-21i64 as u64)),
            ("mul.wide.u32 %rd10, %r2, %r1;", U64(0xffff_fffd * 7)),
            ("mul.wide.s32 %rd10, %r2, -2;", U64(6)),
            (
                "mad.wide.s32 %rd10, %r2, %r1, %rd20;",
                U64(0x1_0000_0005 - 21),
            ),
            ("mul.lo.u64 %rd10, %rd20, %rd20;", U64(0xa_0000_0019)),
            ("add.s64 %rd10, %rd20, -6;", U64(0xffff_ffff)),
            (
                "sub.s64 %rd10, 0, %rd20;",
                U64(0x1_0000_0005u64.wrapping_neg()),
            ),
            ("shr.s64 %rd10, %rd21, 1;", U64(-4i64 as u64)),
            ("shr.u64 %rd10, %rd21, 1;", U64(0x7fff_ffff_ffff_fffc)),
            ("shl.b64 %rd10, %rd20, 4;", U64(0x10_0000_0050)),
            ("cvt.u64.u32 %rd10, %r2;", U64(0xffff_fffd)),
            ("cvt.s64.s32 %rd10, %r2;", U64(-3i64 as u64)),
            ("cvt.u64.u16 %rd10, %rs7;", U64(0x8001)),
            ("cvt.s64.s16 %rd10, %rs7;", U64(-32767i64 as u64)),
            ("mov.b64 %rd10, {%r1, %r2};", U64(0xffff_fffd_0000_0007)),
            ("cvt.rzi.s64.f32 %rd10, 0fC0200000;", U64(-2i64 as u64)),
            ("min.s64 %rd10, %rd21, %rd20;", U64(-8i64 as u64)),
            ("max.u64 %rd10, %rd21, %rd20;", U64(-8i64 as u64)),
        ],
    );
}

#[test]
fn integer_conversions_and_packing() {
    use Want::*;
    run_cases(
        INT_PRELUDE,
        &[
            ("cvt.rni.s32.f32 %r10, 0f40200000;", I32(2)), // 2.5: ties to even
            ("cvt.rni.s32.f32 %r10, 0f40600000;", I32(4)), // 3.5
            ("cvt.rni.s32.f32 %r10, 0fC0200000;", I32(-2)), // -2.5
            ("cvt.rzi.s32.f32 %r10, 0fBFD9999A;", I32(-1)), // -1.7
            ("cvt.rmi.s32.f32 %r10, 0fBF99999A;", I32(-2)), // -1.2
            ("cvt.rpi.s32.f32 %r10, 0f3F99999A;", I32(2)), // 1.2
            ("cvt.rzi.s32.f32 %r10, 0f4F32D05E;", I32(i32::MAX)), // 3e9 saturates
            ("cvt.rzi.s32.f32 %r10, 0fCF32D05E;", I32(i32::MIN)),
            ("cvt.rzi.u32.f32 %r10, 0fC0A00000;", U32(0)), // -5
            ("cvt.rni.u32.f32 %r10, 0f4F32D05E;", U32(3_000_000_000)),
            ("cvt.rzi.s32.f32 %r10, 0f7FC00000;", U32(0)), // NaN
            ("cvt.sat.u8.s32 %r10, %r5;", U32(255)),
            ("cvt.sat.u8.s32 %r10, %r2;", U32(0)),
            ("cvt.u8.u32 %r10, %r5;", U32(44)),
            ("cvt.sat.s16.s32 %r10, %r6;", U32(0x7fff)),
            ("cvt.u32.u64 %r10, %rd20;", U32(5)),
            ("cvt.u32.u16 %r10, %rs1;", U32(0x1111)),
            ("cvt.s32.s16 %r10, %rs7;", I32(-32767)),
            // a goes to the upper half, b to the lower.
            ("cvt.rn.bf16x2.f32 %r10, 0f3F800000, 0f40000000;", U32(0x3f80_4000)),
            ("cvt.rn.bf16x2.f32 %r10, 0f3FC00000, 0fC0200000;", U32(0x3fc0_c020)),
            ("cvt.rn.f16x2.f32 %r10, 0f3F800000, 0f40000000;", U32(0x3c00_4000)),
            // mov.b32 {lo, hi}: the first element is the low half.
            ("mov.b32 %r10, {%rs1, %rs2};", U32(0x2222_1111)),
            ("mov.b32 {%rs3, %rs4}, %r4;\n\tmov.b32 %r10, {%rs4, %rs3};", U32(0x1234_abcd)),
            ("mov.b64 {%r11, %r12}, %rd20;\n\tmul.lo.u32 %r12, %r12, 10;\n\tadd.s32 %r10, %r11, %r12;", U32(15)),
            // bf16 / f16 rounding (nearest even, or toward zero).
            ("cvt.rn.bf16.f32 %rs10, 0f3F808000;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x3f80)),
            ("cvt.rn.bf16.f32 %rs10, 0f3F818000;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x3f82)),
            ("cvt.rn.bf16.f32 %rs10, 0f3F81FFFF;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x3f82)),
            ("cvt.rz.bf16.f32 %rs10, 0f3F81FFFF;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x3f81)),
            ("cvt.rn.f16.f32 %rs10, 0f3F800000;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x3c00)),
            ("cvt.rn.f16.f32 %rs10, 0f477FF000;\n\tcvt.u32.u16 %r10, %rs10;", U32(0x7c00)), // 65520 -> inf
        ],
    );
}

#[test]
fn float_arithmetic_and_conversions() {
    use Want::*;
    let prelude = "\
\tmov.f32 %f1, 0f3FC00000;
\tmov.f32 %f2, 0fC0200000;
\tmov.f32 %f3, 0f7FC00000;
\tmov.f32 %f4, 0f40800000;
\tmov.f32 %f5, 0f3F800800;
\tmov.f32 %f6, 0fBF801000;
\tmov.f32 %f7, 0f33800000;
\tmov.f32 %f8, 0f3F800000;
\tmov.u32 %r2, -3;
\tmov.b64 %rd22, 0x1000001000000001;
\tmov.b64 %rd23, -0x1000001000000001;
\tmov.b16 %rs5, 0x3fc0;
\tmov.b16 %rs6, 0x3e00;
\tmov.f64 %fd1, 0d3FF0000018000000;
\tsetp.ne.u32 %p2, 0, 0;
";
    let third = 1.0f32 / 3.0;
    run_cases(
        prelude,
        &[
            ("add.f32 %f10, %f1, %f2;", F32(-1.0)),
            ("sub.f32 %f10, %f1, %f2;", F32(4.0)),
            ("mul.f32 %f10, %f1, %f2;", F32(-3.75)),
            ("div.rn.f32 %f10, %f8, 0f40400000;", F32(third)),
            ("fma.rn.f32 %f10, %f1, %f2, %f4;", F32(0.25)),
            // (1+2^-12)^2 - (1+2^-11) = 2^-24 fused; 0 with a rounded product.
            (
                "fma.rn.f32 %f10, %f5, %f5, %f6;",
                F32(f32::from_bits(0x3380_0000)),
            ),
            (
                "mul.rn.f32 %f11, %f5, %f5;\n\tadd.rn.f32 %f10, %f11, %f6;",
                F32(0.0),
            ),
            // 1 + 2^-24 is a tie: nearest even, or directed.
            ("add.f32 %f10, %f8, %f7;", F32(1.0)),
            ("add.rz.f32 %f10, %f8, %f7;", F32(1.0)),
            (
                "add.rp.f32 %f10, %f8, %f7;",
                F32(f32::from_bits(0x3f80_0001)),
            ),
            (
                "add.rm.f32 %f10, 0fBF800000, 0fB3800000;",
                F32(f32::from_bits(0xbf80_0001)),
            ),
            ("ex2.approx.f32 %f10, 0f40400000;", F32(8.0)),
            ("ex2.approx.ftz.f32 %f10, 0fBF800000;", F32(0.5)),
            ("lg2.approx.f32 %f10, 0f41000000;", F32(3.0)),
            ("rcp.rn.f32 %f10, %f4;", F32(0.25)),
            ("rcp.approx.ftz.f32 %f10, 0f40000000;", F32(0.5)),
            ("sqrt.rn.f32 %f10, 0f40100000;", F32(1.5)),
            ("rsqrt.approx.f32 %f10, %f4;", F32(0.5)),
            ("tanh.approx.f32 %f10, 0f00000000;", F32(0.0)),
            // copysign d, a, b: b with a's sign.
            ("copysign.f32 %f10, %f2, %f1;", F32(-1.5)),
            ("copysign.f32 %f10, %f1, %f2;", F32(2.5)),
            ("abs.f32 %f10, %f2;", F32(2.5)),
            ("neg.f32 %f10, %f1;", F32(-1.5)),
            ("min.f32 %f10, %f1, %f2;", F32(-2.5)),
            ("max.f32 %f10, %f1, %f2;", F32(1.5)),
            ("min.f32 %f10, %f3, %f1;", F32(1.5)),
            ("max.f32 %f10, %f2, %f3;", F32(-2.5)),
            ("add.f32 %f10, %f3, %f1;", Nan),
            ("add.sat.f32 %f10, %f1, %f1;", F32(1.0)),
            ("mul.sat.f32 %f10, %f1, %f2;", F32(0.0)),
            ("cvt.rn.f32.s32 %f10, %r2;", F32(-3.0)),
            ("cvt.rn.f32.u32 %f10, %r2;", F32(4_294_967_296.0)),
            // 2^60 + 2^36 + 1 rounds up to 2^60 + 2^37 (not via f64, which ties down).
            (
                "cvt.rn.f32.u64 %f10, %rd22;",
                F32(f32::from_bits(0x5d80_0001)),
            ),
            (
                "cvt.rn.f32.s64 %f10, %rd23;",
                F32(f32::from_bits(0xdd80_0001)),
            ),
            ("cvt.rzi.f32.f32 %f10, %f2;", F32(-2.0)),
            ("cvt.rni.f32.f32 %f10, %f2;", F32(-2.0)),
            ("cvt.rmi.f32.f32 %f10, %f2;", F32(-3.0)),
            ("cvt.rpi.f32.f32 %f10, %f1;", F32(2.0)),
            ("cvt.sat.f32.f32 %f10, %f1;", F32(1.0)),
            ("cvt.sat.f32.f32 %f10, %f2;", F32(0.0)),
            ("cvt.sat.f32.f32 %f10, %f3;", F32(0.0)),
            ("cvt.f32.bf16 %f10, %rs5;", F32(1.5)),
            ("cvt.f32.f16 %f10, %rs6;", F32(1.5)),
            // 1 + 2^-24 + 2^-25 in f64.
            (
                "cvt.rn.f32.f64 %f10, %fd1;",
                F32(f32::from_bits(0x3f80_0001)),
            ),
            ("cvt.rz.f32.f64 %f10, %fd1;", F32(1.0)),
            (
                "add.f64 %fd2, %fd1, %fd1;\n\tcvt.rn.f32.f64 %f10, %fd2;",
                F32(f32::from_bits(0x4000_0001)),
            ),
            ("selp.f32 %f10, %f1, %f2, %p2;", F32(-2.5)),
            ("mov.b32 %f10, 0x3f800000;", F32(1.0)),
        ],
    );
}

#[test]
fn comparisons_and_predicate_logic() {
    use Want::*;
    let prelude = "\
\tmov.u32 %r1, 7;
\tmov.u32 %r2, -3;
\tmov.f32 %f1, 0f3FC00000;
\tmov.f32 %f2, 0fC0200000;
\tmov.f32 %f3, 0f7FC00000;
\tsetp.lt.s32 %p1, %r2, %r1;
\tsetp.lt.u32 %p2, %r2, %r1;
";
    run_cases(
        prelude,
        &[
            ("setp.lt.s32 %p10, %r2, %r1;", Pred(true)),
            ("setp.lt.u32 %p10, %r2, %r1;", Pred(false)),
            ("setp.ge.u32 %p10, %r2, %r1;", Pred(true)),
            ("setp.hi.u32 %p10, %r2, %r1;", Pred(true)),
            ("setp.lo.u32 %p10, %r2, %r1;", Pred(false)),
            ("setp.ls.u32 %p10, %r1, %r1;", Pred(true)),
            ("setp.hs.u32 %p10, %r1, %r2;", Pred(false)),
            ("setp.gt.s32 %p10, %r2, -4;", Pred(true)),
            ("setp.eq.s32 %p10, %r2, -3;", Pred(true)),
            ("setp.ne.u32 %p10, %r1, 7;", Pred(false)),
            ("setp.le.s32 %p10, %r1, %r2;", Pred(false)),
            ("setp.lt.f32 %p10, %f2, %f1;", Pred(true)),
            ("setp.gt.f32 %p10, %f3, %f1;", Pred(false)),
            ("setp.gtu.f32 %p10, %f3, %f1;", Pred(true)),
            ("setp.gtu.f32 %p10, %f2, %f1;", Pred(false)),
            ("setp.eq.f32 %p10, %f3, %f3;", Pred(false)),
            ("setp.equ.f32 %p10, %f3, %f3;", Pred(true)),
            ("setp.ne.f32 %p10, %f3, %f1;", Pred(false)),
            ("setp.neu.f32 %p10, %f3, %f1;", Pred(true)),
            ("setp.neu.f32 %p10, %f1, %f1;", Pred(false)),
            ("setp.le.f32 %p10, %f1, %f1;", Pred(true)),
            ("setp.leu.f32 %p10, %f1, %f2;", Pred(false)),
            ("setp.ltu.f32 %p10, %f2, %f1;", Pred(true)),
            ("setp.geu.f32 %p10, %f3, %f1;", Pred(true)),
            ("setp.ge.f32 %p10, %f3, %f1;", Pred(false)),
            ("setp.nan.f32 %p10, %f1, %f3;", Pred(true)),
            ("setp.num.f32 %p10, %f1, %f3;", Pred(false)),
            ("setp.num.f32 %p10, %f1, %f2;", Pred(true)),
            ("setp.lt.and.s32 %p10, %r2, %r1, %p2;", Pred(false)),
            ("setp.lt.or.s32 %p10, %r1, %r2, %p1;", Pred(true)),
            ("setp.lt.xor.s32 %p10, %r2, %r1, %p1;", Pred(false)),
            // p|q: q is the complement of the comparison (combined with c).
            ("setp.lt.s32 %p11|%p10, %r1, %r2;", Pred(true)),
            ("setp.lt.s32 %p10|%p11, %r1, %r2;", Pred(false)),
            ("setp.lt.and.s32 %p11|%p10, %r2, %r1, %p2;", Pred(false)),
            ("setp.lt.or.s32 %p11|%p10, %r2, %r1, %p1;", Pred(true)),
            ("setp.lt.or.s32 %p11|%p10, %r2, %r1, %p2;", Pred(false)),
            ("and.pred %p10, %p1, %p2;", Pred(false)),
            ("or.pred %p10, %p1, %p2;", Pred(true)),
            ("xor.pred %p10, %p1, %p1;", Pred(false)),
            ("not.pred %p10, %p2;", Pred(true)),
            ("mov.pred %p10, %p1;", Pred(true)),
        ],
    );
}

#[test]
fn predicated_instructions_branches_and_loops() {
    let body = "\
\tmov.u32 %r1, 7;
\tsetp.gt.u32 %p1, %r1, 5;
\tsetp.gt.u32 %p2, %r1, 50;
\tmov.u32 %r20, 0;
\tmov.u32 %r21, 1;
$L__loop:
\tadd.s32 %r20, %r20, %r21;
\tadd.s32 %r21, %r21, 1;
\tsetp.le.s32 %p5, %r21, 10;
\t@%p5 bra $L__loop;
\tst.global.u32 [%rd1], %r20;
\tmov.u32 %r22, 1;
\t@%p1 mov.u32 %r22, 2;
\t@!%p1 mov.u32 %r22, 3;
\t@%p2 mov.u32 %r22, 4;
\tbra.uni $L__skip;
\tmov.u32 %r22, 99;
$L__skip:
\tst.global.u32 [%rd1+4], %r22;
\t@%p2 st.global.u32 [%rd1+8], %r22;
\t@!%p2 st.global.u32 [%rd1+12], %r22;
\t@%p1 bra $L__taken;
\tst.global.u32 [%rd1+16], %r22;
$L__taken:
\t@!%p1 ret;
\tst.global.u32 [%rd1+20], %r21;
\t@%p1 ret;
\tst.global.u32 [%rd1+24], %r21;
";
    let src = module("", 1, body);
    let mut mem = Mem::default();
    let out = mem.out(7);
    ok(&src, &mut mem, 1, 1, 0, &[out]);
    assert_eq!(
        mem.u32s(out),
        [55, 2, SENTINEL, 2, SENTINEL, 11, SENTINEL],
        "loop sum, predicated movs, skipped branch, predicated stores, predicated ret"
    );
}

#[test]
fn divergent_threads_loop_different_trip_counts_and_reconverge() {
    // Thread t sums 1..=t (t iterations), odd and even threads take
    // different paths, and all meet at a shfl afterwards.
    let body = "\
\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, 0;
\tmov.u32 %r3, 1;
\tsetp.eq.u32 %p1, %r1, 0;
\t@%p1 bra $L__done;
$L__loop:
\tadd.s32 %r2, %r2, %r3;
\tadd.s32 %r3, %r3, 1;
\tsetp.le.u32 %p2, %r3, %r1;
\t@%p2 bra $L__loop;
$L__done:
\tand.b32 %r4, %r1, 1;
\tsetp.eq.u32 %p3, %r4, 1;
\t@%p3 bra $L__odd;
\tmul.lo.u32 %r5, %r1, 100;
\tbra.uni $L__join;
$L__odd:
\tmul.lo.u32 %r5, %r1, 1000;
$L__join:
\tshfl.sync.bfly.b32 %r6, %r5, 1, 0x1f, -1;
\tmul.wide.u32 %rd10, %r1, 8;
\tadd.s64 %rd11, %rd1, %rd10;
\tst.global.u32 [%rd11], %r2;
\tst.global.u32 [%rd11+4], %r6;
";
    let src = module("", 1, body);
    let mut mem = Mem::default();
    let n = 40u32;
    let out = mem.out(2 * n as usize);
    ok(&src, &mut mem, 1, n, 0, &[out]);
    let got = mem.u32s(out);
    let val = |t: u32| if t % 2 == 1 { t * 1000 } else { t * 100 };
    for t in 0..n {
        assert_eq!(got[2 * t as usize], t * (t + 1) / 2, "sum of thread {t}");
        let partner = t ^ 1;
        assert_eq!(got[2 * t as usize + 1], val(partner), "shfl of thread {t}");
    }
}

#[test]
fn inline_asm_scopes_shadow_registers() {
    let body = "\
\tmov.u32 %r1, 0;
\tsetp.eq.u32 %p1, %r1, 0;
\t{
\t.reg .pred %p1;
\t.reg .b32 %inner;
\tsetp.ne.u32 %p1, %r1, 0;
\tselp.u32 %r2, 1, 0, %p1;
\tmov.u32 %inner, 41;
\tadd.s32 %r4, %inner, 1;
\t}
\tselp.u32 %r3, 1, 0, %p1;
\tst.global.u32 [%rd1], %r2;
\tst.global.u32 [%rd1+4], %r3;
\tst.global.u32 [%rd1+8], %r4;
";
    let src = module("", 1, body);
    let mut mem = Mem::default();
    let out = mem.out(3);
    ok(&src, &mut mem, 1, 1, 0, &[out]);
    assert_eq!(mem.u32s(out), [0, 1, 42]);
}

// ---- special registers -----------------------------------------------------

#[test]
fn special_registers_over_a_3d_grid_of_3d_blocks() {
    let body = "\
\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, %tid.y;
\tmov.u32 %r3, %tid.z;
\tshl.b32 %r20, %r2, 8;
\tshl.b32 %r21, %r3, 16;
\tor.b32 %r22, %r1, %r20;
\tor.b32 %r40, %r22, %r21;
\tmov.u32 %r4, %ctaid.x;
\tmov.u32 %r5, %ctaid.y;
\tmov.u32 %r6, %ctaid.z;
\tshl.b32 %r20, %r5, 8;
\tshl.b32 %r21, %r6, 16;
\tor.b32 %r22, %r4, %r20;
\tor.b32 %r41, %r22, %r21;
\tmov.u32 %r11, %ntid.x;
\tmov.u32 %r12, %ntid.y;
\tmov.u32 %r13, %ntid.z;
\tshl.b32 %r20, %r12, 8;
\tshl.b32 %r21, %r13, 16;
\tor.b32 %r22, %r11, %r20;
\tor.b32 %r42, %r22, %r21;
\tmov.u32 %r7, %nctaid.x;
\tmov.u32 %r8, %nctaid.y;
\tmov.u32 %r9, %nctaid.z;
\tshl.b32 %r20, %r8, 8;
\tshl.b32 %r21, %r9, 16;
\tor.b32 %r22, %r7, %r20;
\tor.b32 %r43, %r22, %r21;
\tmad.lo.u32 %r30, %r6, %r8, %r5;
\tmad.lo.u32 %r30, %r30, %r7, %r4;
\tmul.lo.u32 %r31, %r11, %r12;
\tmul.lo.u32 %r31, %r31, %r13;
\tmad.lo.u32 %r32, %r3, %r12, %r2;
\tmad.lo.u32 %r32, %r32, %r11, %r1;
\tmad.lo.u32 %r33, %r30, %r31, %r32;
\tmul.wide.u32 %rd10, %r33, 16;
\tadd.s64 %rd11, %rd1, %rd10;
\tst.global.v4.u32 [%rd11], {%r40, %r41, %r42, %r43};
";
    let src = module("", 1, body);
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 2u32, 3u32));
    let nthreads = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
    let mut mem = Mem::default();
    let out = mem.out(4 * nthreads);
    let st = launch(&src, &mut mem, grid, block, 0, &[out]).unwrap();
    assert_eq!(st.ctas, 12);
    let got = mem.u32s(out);
    let pack = |x: u32, y: u32, z: u32| x | y << 8 | z << 16;
    let mut gid = 0;
    for cz in 0..grid.2 {
        for cy in 0..grid.1 {
            for cx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = [
                                pack(tx, ty, tz),
                                pack(cx, cy, cz),
                                pack(block.0, block.1, block.2),
                                pack(grid.0, grid.1, grid.2),
                            ];
                            assert_eq!(got[4 * gid..4 * gid + 4], want, "thread {gid}");
                            gid += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(gid, nthreads);
}

#[test]
fn global_thread_ids_lane_and_warp_ids() {
    // Blocks of 80 threads: two full warps and a partial one.
    let body = format!(
        "{}\tmov.u32 %r1, %laneid;\n\tmov.u32 %r2, %warpid;\n\tshl.b32 %r3, %r2, 8;\n\
         \tor.b32 %r4, %r1, %r3;\n\tst.global.u32 [%rd40], %r93;\n\tst.global.u32 [%rd40+4], %r4;\n",
        thread_slot(2)
    );
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let (grid, block) = (5u32, 80u32);
    let out = mem.out(2 * (grid * block) as usize);
    let st = ok(&src, &mut mem, grid, block, 0, &[out]);
    assert_eq!(st.ctas, 5);
    let got = mem.u32s(out);
    for g in 0..grid * block {
        let t = g % block;
        assert_eq!(got[2 * g as usize], g);
        assert_eq!(
            got[2 * g as usize + 1],
            (t % 32) | (t / 32) << 8,
            "thread {g}"
        );
    }
}

// ---- memory spaces -----------------------------------------------------------

#[test]
fn params_vectors_bytes_and_cvta() {
    let src = format!(
        "{HEADER}.visible .entry k(.param .u64 k_param_0, .param .u64 k_param_1, .param .u64 k_param_2, \
         .param .u32 k_param_3, .param .f32 k_param_4)\n{{\n{REGS}\
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u64 %rd2, [k_param_1];
\tld.param.u64 %rd3, [k_param_2];
\tld.param.u32 %r1, [k_param_3];
\tld.param.f32 %f1, [k_param_4];
\tld.param.u32 %r9, [k_param_0+4];
\tcvta.to.global.u64 %rd4, %rd1;
\tcvta.to.global.u64 %rd5, %rd2;
\tmov.u32 %r2, %tid.x;
\tmul.wide.u32 %rd6, %r2, 16;
\tadd.s64 %rd7, %rd4, %rd6;
\tadd.s64 %rd8, %rd5, %rd6;
\tld.global.v2.u32 {{%r3, %r4}}, [%rd7];
\tmul.lo.u32 %r5, %r3, %r1;
\tadd.s32 %r6, %r4, %r9;
\tst.global.v2.u32 [%rd8], {{%r5, %r6}};
\tld.global.nc.v2.f32 {{%f2, %f3}}, [%rd7+8];
\tmul.f32 %f4, %f2, %f1;
\tmul.f32 %f5, %f3, %f1;
\tst.global.v2.f32 [%rd8+8], {{%f4, %f5}};
\tld.global.u8 %rs1, [%rd7+1];
\tld.global.u16 %rs2, [%rd7+6];
\tmul.wide.u32 %rd9, %r2, 4;
\tadd.s64 %rd10, %rd3, %rd9;
\tst.global.u8 [%rd10], %rs1;
\tst.global.u8 [%rd10+1], 0x7f;
\tst.global.u16 [%rd10+2], %rs2;
\tret;
}}
"
    );
    let mut mem = Mem::default();
    let n = 4usize;
    let mut input = Vec::new();
    for t in 0..n as u32 {
        input.extend_from_slice(&(0x0102_0304 * (t + 1)).to_le_bytes());
        input.extend_from_slice(&(0xa0b0_c0d0u32 + t).to_le_bytes());
        input.extend_from_slice(&(t as f32 + 0.5).to_le_bytes());
        input.extend_from_slice(&(-(t as f32)).to_le_bytes());
    }
    let inp = mem.add(input.clone());
    let out = mem.out(4 * n);
    let out2 = mem.out(n);
    let scale = 3u32;
    let fscale = 2.0f32;
    ok(
        &src,
        &mut mem,
        1,
        n as u32,
        0,
        &[inp, out, out2, scale as u64, fscale.to_bits() as u64],
    );
    let got = mem.u32s(out);
    let got2 = mem.bytes(out2).to_vec();
    for t in 0..n {
        let w = |k: usize| {
            u32::from_le_bytes(
                input[16 * t + 4 * k..16 * t + 4 * k + 4]
                    .try_into()
                    .unwrap(),
            )
        };
        assert_eq!(got[4 * t], w(0).wrapping_mul(scale));
        // `ld.param.u32 [k_param_0+4]`: the upper half of the pointer (buffer 1).
        assert_eq!(got[4 * t + 1], w(1).wrapping_add(1));
        assert_eq!(
            f32::from_bits(got[4 * t + 2]),
            f32::from_bits(w(2)) * fscale
        );
        assert_eq!(
            f32::from_bits(got[4 * t + 3]),
            f32::from_bits(w(3)) * fscale
        );
        assert_eq!(got2[4 * t], input[16 * t + 1]);
        assert_eq!(got2[4 * t + 1], 0x7f);
        assert_eq!(got2[4 * t + 2..4 * t + 4], input[16 * t + 6..16 * t + 8]);
    }
}

#[test]
fn module_global_and_const_variables_with_initialisers() {
    let vars = "\
.global .align 4 .u32 gtab[4] = {10, 20, 30, 40};
.const .align 4 .f32 cval = 0f40490FDB;
.global .align 8 .u64 gscalar = 0x123456789;
.const .align 4 .s32 cneg[2] = {-5, 6};
";
    let body = "\
\tld.global.u32 %r1, [gtab+8];
\tmov.u64 %rd10, gtab;
\tld.global.u32 %r2, [%rd10+12];
\tld.const.f32 %f1, [cval];
\tld.global.u64 %rd11, [gscalar];
\tld.const.s32 %r3, [cneg];
\tld.const.s32 %r4, [cneg+4];
\tmov.u32 %r5, 99;
\tst.global.u32 [gtab+4], %r5;
\tst.global.u32 [%rd1], %r1;
\tst.global.u32 [%rd1+4], %r2;
\tst.global.f32 [%rd1+8], %f1;
\tst.global.u64 [%rd1+16], %rd11;
\tst.global.u32 [%rd1+24], %r3;
\tst.global.u32 [%rd1+28], %r4;
";
    let src = module(vars, 1, body);
    let mut mem = Mem::default();
    let out = mem.out(8);
    ok(&src, &mut mem, 1, 1, 0, &[out]);
    let got = mem.u32s(out);
    assert_eq!(got[0], 30);
    assert_eq!(got[1], 40);
    assert_eq!(got[2], 0x4049_0fdb);
    assert_eq!(got[4] as u64 | (got[5] as u64) << 32, 0x1_2345_6789);
    assert_eq!(got[6], -5i32 as u32);
    assert_eq!(got[7], 6);
    // The variables became buffers (in declaration order, after `out`);
    // the store reached gtab.
    assert_eq!(mem.bufs.len(), 5);
    assert_eq!(mem.u32s(2 << 32), [10, 99, 30, 40]);
    assert_eq!(mem.u32s(3 << 32), [0x4049_0fdb]);
}

#[test]
fn dynamic_shared_memory_follows_the_static_arrays() {
    let vars = "\
.shared .align 4 .b8 s_a[20];
.extern .shared .align 16 .b8 dyn[];
";
    let body = "\
\t.shared .align 8 .b8 s_local[12];
\tmov.u32 %r1, s_a;
\tmov.u32 %r2, s_local;
\tmov.u32 %r3, dyn;
\tst.global.u32 [%rd1], %r1;
\tst.global.u32 [%rd1+4], %r2;
\tst.global.u32 [%rd1+8], %r3;
\tmov.u32 %r4, 0x01020304;
\tst.shared.u32 [dyn+60], %r4;
\tst.shared.u32 [s_a+16], %r4;
\tst.shared.u32 [s_local+8], %r4;
\tld.shared.u32 %r5, [dyn+60];
\tst.global.u32 [%rd1+12], %r5;
\tld.shared.u32 %r6, [dyn];
\tst.global.u32 [%rd1+16], %r6;
";
    let src = module(vars, 1, body);
    let mut mem = Mem::default();
    let out = mem.out(5);
    let st = ok(&src, &mut mem, 1, 1, 64, &[out]);
    let got = mem.u32s(out);
    let (a, local, dynamic) = (got[0], got[1], got[2]);
    assert_eq!(local % 8, 0, "s_local keeps its alignment");
    assert!(
        a + 20 <= local || local + 12 <= a,
        "static arrays overlap: {got:?}"
    );
    assert_eq!(dynamic % 16, 0, "dynamic shared memory is 16-byte aligned");
    assert!(
        dynamic >= a + 20 && dynamic >= local + 12,
        "dyn overlaps a static array: {got:?}"
    );
    assert_eq!(got[3], 0x0102_0304);
    assert_eq!(got[4], u32::MAX, "shared memory starts as 0xff bytes (NaN)");
    assert_eq!(st.smem_bytes, dynamic as usize + 64);

    // One byte past the dynamic allocation is outside shared memory.
    let bad = module(
        vars,
        1,
        "\tmov.u32 %r4, 1;\n\tst.shared.u32 [dyn+64], %r4;\n",
    );
    let e = fails(&bad, &mut mem, 1, 1, 64, &[out]);
    assert_msg(&e, "outside");
    assert_eq!(e.line, line_of(&bad, "st.shared.u32 [dyn+64]"));
}

#[test]
fn shared_loads_and_stores_of_every_width() {
    let vars = ".shared .align 8 .b8 sbuf[512];\n";
    // Thread t stores t * 0x0001_0001_0001_0001 as u64 at 8t, a u16 and a
    // u8 in a second area, then reads its neighbour's after a barrier.
    let body = "\
\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, sbuf;
\tcvt.u64.u32 %rd10, %r1;
\tmul.lo.u64 %rd11, %rd10, 0x0001000100010001;
\tshl.b32 %r3, %r1, 3;
\tadd.s32 %r4, %r2, %r3;
\tst.shared.u64 [%r4], %rd11;
\tshl.b32 %r5, %r1, 2;
\tadd.s32 %r6, %r2, %r5;
\tcvt.u16.u32 %rs1, %r1;
\tst.shared.u16 [%r6+256], %rs1;
\tst.shared.u8 [%r6+258], %rs1;
\tst.shared.u8 [%r6+259], 0x5a;
\tbar.sync 0;
\tadd.s32 %r7, %r1, 1;
\tand.b32 %r7, %r7, 31;
\tshl.b32 %r8, %r7, 3;
\tadd.s32 %r9, %r2, %r8;
\tld.shared.v2.u32 {%r10, %r11}, [%r9];
\tld.shared.u16 %rs2, [%r9+2];
\tshl.b32 %r12, %r7, 2;
\tadd.s32 %r13, %r2, %r12;
\tld.shared.u32 %r14, [%r13+256];
\tcvt.u32.u16 %r15, %rs2;
\tmul.wide.u32 %rd12, %r1, 16;
\tadd.s64 %rd13, %rd1, %rd12;
\tst.global.v4.u32 [%rd13], {%r10, %r11, %r15, %r14};
";
    let src = module(vars, 1, body);
    let mut mem = Mem::default();
    let out = mem.out(4 * 32);
    let st = ok(&src, &mut mem, 1, 32, 0, &[out]);
    assert_eq!(st.barriers, 1);
    let got = mem.u32s(out);
    for t in 0..32u32 {
        let u = (t + 1) % 32;
        let w = u | u << 16;
        // u16 at bytes 0..2, the low byte of u at byte 2, 0x5a at byte 3.
        let want = [w, w, u, (u & 0xffff) | (u & 0xff) << 16 | 0x5a << 24];
        assert_eq!(got[4 * t as usize..4 * t as usize + 4], want, "thread {t}");
    }
}

// ---- warp collectives ----------------------------------------------------------

#[test]
fn shfl_modes_with_clamps_segments_and_predicates() {
    // Two warps; lane value v = 1000 + 10 * tid.
    let mut body = String::from(
        "\tmov.u32 %r1, %tid.x;
\tand.b32 %r2, %r1, 31;
\tmad.lo.u32 %r3, %r1, 10, 1000;
\tshfl.sync.bfly.b32 %r4|%p1, %r3, 5, 0x1f, -1;
\tshfl.sync.up.b32 %r5|%p2, %r3, 3, 0, -1;
\tshfl.sync.down.b32 %r6|%p3, %r3, 3, 0x1f, -1;
\tsub.s32 %r7, 31, %r2;
\tshfl.sync.idx.b32 %r8|%p4, %r3, %r7, 0x1f, 0xffffffff;
\tshfl.sync.down.b32 %r9|%p5, %r3, 2, 0x181f, -1;
\tshfl.sync.idx.b32 %r10|%p6, %r3, 2, 0x181f, -1;
\tshfl.sync.up.b32 %r11|%p7, %r3, 1, 0x1800, -1;
\tshfl.sync.bfly.b32 %r12, %r3, 16, 0x1f, -1;
\tshfl.sync.idx.b32 %r13, %r3, 37, 0x1f, -1;
\tshfl.sync.bfly.b32 %r14, %r3, 33, 0x1f, -1;
",
    );
    for k in 1..=7 {
        body += &format!("\tselp.u32 %r{}, 1, 0, %p{k};\n", 20 + k);
    }
    body += &thread_slot(17);
    body += &store_words(
        "%rd40",
        &[
            "%r4", "%r21", "%r5", "%r22", "%r6", "%r23", "%r8", "%r24", "%r9", "%r25", "%r10",
            "%r26", "%r11", "%r27", "%r12", "%r13", "%r14",
        ],
    );
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let out = mem.out(17 * 64);
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..64u32 {
        let (wb, l) = (t & !31, t & 31);
        let v = |lane: u32| 1000 + 10 * (wb + lane);
        let pick = |ok: bool, lane: u32| if ok { [v(lane), 1] } else { [v(l), 0] };
        let want: Vec<u32> = [
            pick(true, l ^ 5),
            pick(l >= 3, l.wrapping_sub(3)),
            pick(l + 3 <= 31, l + 3),
            pick(true, 31 - l),
            // Width 8 (c = 0x181f): segments of 8 lanes.
            pick((l & 7) + 2 <= 7, l + 2),
            pick(true, (l & !7) | 2),
            // Width 8 up (c = 0x1800).
            pick(l & 7 >= 1, l.wrapping_sub(1)),
        ]
        .concat()
        .into_iter()
        // b is taken mod 32: idx 37 reads lane 5, bfly 33 lane l ^ 1.
        .chain([v(l ^ 16), v(5), v(l ^ 1)])
        .collect();
        assert_eq!(
            got[17 * t as usize..17 * t as usize + 17],
            want[..],
            "thread {t}"
        );
    }
}

#[test]
fn shfl_within_a_partial_member_mask() {
    // Lanes 16..31 exit; the rest shuffle within mask 0xffff.
    let body = "\
\tmov.u32 %r1, %tid.x;
\tsetp.ge.u32 %p1, %r1, 16;
\t@%p1 ret;
\tmul.lo.u32 %r2, %r1, 3;
\tshfl.sync.bfly.b32 %r3, %r2, 1, 0x1f, 0xffff;
\tmul.wide.u32 %rd10, %r1, 4;
\tadd.s64 %rd11, %rd1, %rd10;
\tst.global.u32 [%rd11], %r3;
";
    let src = module("", 1, body);
    let mut mem = Mem::default();
    let out = mem.out(32);
    ok(&src, &mut mem, 1, 32, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..32u32 {
        let want = if t < 16 { 3 * (t ^ 1) } else { SENTINEL };
        assert_eq!(got[t as usize], want, "lane {t}");
    }
    // Reading an exited lane is an error.
    let bad = body.replace("bfly.b32 %r3, %r2, 1,", "bfly.b32 %r3, %r2, 16,");
    let bad = module("", 1, &bad);
    let e = fails(&bad, &mut mem, 1, 32, 0, &[out]);
    assert_eq!(e.line, line_of(&bad, "shfl.sync"));
}

#[test]
fn vote_ballot_any_all() {
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\trem.u32 %r2, %r1, 3;
\tsetp.eq.u32 %p1, %r2, 0;
\tvote.sync.ballot.b32 %r3, %p1, -1;
\tsetp.eq.u32 %p2, %r1, 40;
\tvote.sync.any.pred %p3, %p2, -1;
\tsetp.lt.u32 %p4, %r1, 100;
\tvote.sync.all.pred %p5, %p4, -1;
\tvote.sync.all.pred %p6, %p1, -1;
\tvote.sync.ballot.b32 %r4, !%p1, -1;
\tselp.u32 %r5, 1, 0, %p3;
\tselp.u32 %r6, 1, 0, %p5;
\tselp.u32 %r7, 1, 0, %p6;
{}{}",
        thread_slot(5),
        store_words("%rd40", &["%r3", "%r5", "%r6", "%r7", "%r4"])
    );
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let out = mem.out(5 * 64);
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..64u32 {
        let wb = t & !31;
        let ballot: u32 = (0..32).filter(|l| (wb + l) % 3 == 0).map(|l| 1 << l).sum();
        let any = (wb..wb + 32).contains(&40) as u32;
        assert_eq!(
            got[5 * t as usize..5 * t as usize + 5],
            [ballot, any, 1, 0, !ballot],
            "thread {t}"
        );
    }
}

/// Element (row r, column c) of 8x8 matrix m in the ldmatrix test: the
/// shared tile holds 32 rows of 8 b16 values, row i = [8i, 8i + 8).
fn ldm_elem(row_of: &dyn Fn(usize, usize) -> usize, m: usize, r: usize, c: usize) -> u32 {
    (row_of(m, r) * 8 + c) as u32
}

#[test]
fn ldmatrix_fragments_follow_the_ptx_layout() {
    let vars = ".shared .align 16 .b8 tile[512];\n";
    // Thread l writes tile row l = [8l, 8l + 8); %r4 = &row l, %r23 = &row 31 - l.
    let mut body = String::from(
        "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, tile;
\tshl.b32 %r3, %r1, 4;
\tadd.s32 %r4, %r2, %r3;
\tshl.b32 %r5, %r1, 3;
\tadd.s32 %r6, %r5, 1;
\tshl.b32 %r6, %r6, 16;
\tor.b32 %r6, %r6, %r5;
\tadd.s32 %r7, %r6, 0x20002;
\tadd.s32 %r8, %r7, 0x20002;
\tadd.s32 %r9, %r8, 0x20002;
\tst.shared.v4.u32 [%r4], {%r6, %r7, %r8, %r9};
\tbar.sync 0;
\tsub.s32 %r24, 31, %r1;
\tshl.b32 %r24, %r24, 4;
\tadd.s32 %r23, %r2, %r24;
\tsetp.lt.u32 %p1, %r1, 16;
\tselp.u32 %r20, %r4, 0xfff0, %p1;
\tsetp.lt.u32 %p2, %r1, 8;
\tselp.u32 %r22, %r4, 0x7, %p2;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r10, %r11, %r12, %r13}, [%r4];
\tldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r14, %r15, %r16, %r17}, [%r4];
\tldmatrix.sync.aligned.m8n8.x2.shared.b16 {%r18, %r19}, [%r20];
\tldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r30, %r31}, [%r20];
\tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r32}, [%r22];
\tldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%r21}, [%r22];
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r33, %r34, %r35, %r36}, [%r23];
\tldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r37, %r38, %r39, %r40}, [%r23];
",
    );
    let regs = [
        "%r10", "%r11", "%r12", "%r13", "%r14", "%r15", "%r16", "%r17", "%r18", "%r19", "%r30",
        "%r31", "%r32", "%r21", "%r33", "%r34", "%r35", "%r36", "%r37", "%r38", "%r39", "%r40",
    ];
    body += &thread_slot(regs.len() as u32);
    body += &store_words("%rd40", &regs);
    let src = module(vars, 1, &body);
    let mut mem = Mem::default();
    let out = mem.out(regs.len() * 32);
    ok(&src, &mut mem, 1, 32, 0, &[out]);
    let got = mem.u32s(out);
    let direct = |m: usize, r: usize| 8 * m + r;
    let reversed = |m: usize, r: usize| 31 - (8 * m + r);
    for l in 0..32usize {
        // Lane l: row l / 4, columns 2 (l % 4) and + 1 (low half first);
        // .trans: the transposed element.
        let frag = |row_of: &dyn Fn(usize, usize) -> usize, m: usize, trans: bool| {
            let (g, c) = (l / 4, 2 * (l % 4));
            let (lo, hi) = if trans {
                (ldm_elem(row_of, m, c, g), ldm_elem(row_of, m, c + 1, g))
            } else {
                (ldm_elem(row_of, m, g, c), ldm_elem(row_of, m, g, c + 1))
            };
            lo | hi << 16
        };
        let mut want = Vec::new();
        for trans in [false, true] {
            want.extend((0..4).map(|m| frag(&direct, m, trans)));
        }
        want.extend((0..2).map(|m| frag(&direct, m, false)));
        want.extend((0..2).map(|m| frag(&direct, m, true)));
        want.push(frag(&direct, 0, false));
        want.push(frag(&direct, 0, true));
        for trans in [false, true] {
            want.extend((0..4).map(|m| frag(&reversed, m, trans)));
        }
        let n = regs.len();
        assert_eq!(got[n * l..n * l + n], want[..], "lane {l}");
    }
}

/// The A (16 x k), B (k x 8) and C (16 x 8) of the mma tests: small
/// multiples of 1/2, exact in bf16 and f16, products exact in f32.
type Matrix = Vec<Vec<f32>>;

fn mma_operands(k: usize) -> (Matrix, Matrix, Matrix) {
    let a = (0..16)
        .map(|i| {
            (0..k)
                .map(|kk| (((i * 3 + kk * 5) % 7) as f32 - 3.0) * 0.5)
                .collect()
        })
        .collect();
    let b = (0..k)
        .map(|kk| {
            (0..8)
                .map(|j| ((kk * 2 + j * 3) % 5) as f32 - 2.0)
                .collect()
        })
        .collect();
    let c = (0..16)
        .map(|i| (0..8).map(|j| i as f32 - 2.0 * j as f32 + 0.25).collect())
        .collect();
    (a, b, c)
}

fn matmul_add(a: &[Vec<f32>], b: &[Vec<f32>], c: &[Vec<f32>]) -> Vec<f32> {
    let mut d = Vec::new();
    for i in 0..16 {
        for j in 0..8 {
            let mut acc = c[i][j] as f64;
            for (kk, brow) in b.iter().enumerate() {
                acc += a[i][kk] as f64 * brow[j] as f64;
            }
            d.push(acc as f32);
        }
    }
    d
}

fn half_bits(x: f32, bf: bool) -> [u8; 2] {
    if bf {
        bf16::from_f32(x).to_bits().to_le_bytes()
    } else {
        f16::from_f32(x).to_bits().to_le_bytes()
    }
}

/// mma.sync m16n8k{k} with each lane loading its fragments from global
/// memory per the PTX ISA layout: A row-major, B as B^T row-major (so a
/// fragment's two k values are adjacent), C and D row-major f32.
fn mma_from_global(k: usize, bf: bool) {
    let ty = if bf { "bf16" } else { "f16" };
    let row8 = 8 * k * 2; // bytes of 8 rows of A (and of B^T... 8 rows of k)
    let (a_regs, b_regs, extra_loads) = if k == 16 {
        (
            "{%r10, %r11, %r12, %r13}",
            "{%r14, %r15}",
            format!(
                "\tld.global.u32 %r12, [%rd11+16];\n\tld.global.u32 %r13, [%rd11+{}];\n\
                 \tld.global.u32 %r15, [%rd12+16];\n",
                row8 + 16
            ),
        )
    } else {
        ("{%r10, %r11}", "{%r14}", String::new())
    };
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tshr.u32 %r2, %r1, 2;
\tand.b32 %r3, %r1, 3;
\tshl.b32 %r5, %r3, 1;
\tmad.lo.u32 %r6, %r2, {k}, %r5;
\tmul.wide.u32 %rd10, %r6, 2;
\tadd.s64 %rd11, %rd1, %rd10;
\tadd.s64 %rd12, %rd2, %rd10;
\tld.global.u32 %r10, [%rd11];
\tld.global.u32 %r11, [%rd11+{row8}];
\tld.global.u32 %r14, [%rd12];
{extra_loads}\tmad.lo.u32 %r7, %r2, 8, %r5;
\tmul.wide.u32 %rd13, %r7, 4;
\tadd.s64 %rd14, %rd3, %rd13;
\tld.global.v2.f32 {{%f1, %f2}}, [%rd14];
\tld.global.v2.f32 {{%f3, %f4}}, [%rd14+256];
\tmma.sync.aligned.m16n8k{k}.row.col.f32.{ty}.{ty}.f32 {{%f5, %f6, %f7, %f8}}, {a_regs}, {b_regs}, {{%f1, %f2, %f3, %f4}};
\tadd.s64 %rd15, %rd4, %rd13;
\tst.global.v2.f32 [%rd15], {{%f5, %f6}};
\tst.global.v2.f32 [%rd15+256], {{%f7, %f8}};
"
    );
    let src = module("", 4, &body);
    let (a, b, c) = mma_operands(k);
    let mut mem = Mem::default();
    let a_buf = mem.add(a.iter().flatten().flat_map(|&x| half_bits(x, bf)).collect());
    let bt: Vec<u8> = (0..8)
        .flat_map(|j| (0..k).map(move |kk| (kk, j)))
        .flat_map(|(kk, j)| half_bits(b[kk][j], bf))
        .collect();
    let b_buf = mem.add(bt);
    let c_buf = mem.floats(&c.concat());
    let d_buf = mem.out(16 * 8);
    let st = ok(&src, &mut mem, 1, 32, 0, &[a_buf, b_buf, c_buf, d_buf]);
    assert_eq!(st.mma, 1);
    let want = matmul_add(&a, &b, &c);
    let got = mem.f32s(d_buf);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "D[{}][{}] (m16n8k{k} {ty})", i / 8, i % 8);
    }
}

#[test]
fn mma_m16n8k16_bf16() {
    mma_from_global(16, true);
}

#[test]
fn mma_m16n8k16_f16() {
    mma_from_global(16, false);
}

#[test]
fn mma_m16n8k8_bf16() {
    mma_from_global(8, true);
}

#[test]
fn cp_async_then_ldmatrix_feeds_mma() {
    // The usual pipeline: A (16x16 row-major) and B (16x8 row-major, k x n)
    // copied to shared memory by cp.async, A fragments by ldmatrix.x4, B
    // fragments by ldmatrix.x2.trans.
    let vars = ".extern .shared .align 16 .b8 smem[];\n";
    let body = "\
\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, smem;
\tshl.b32 %r3, %r1, 4;
\tadd.s32 %r4, %r2, %r3;
\tcvt.u64.u32 %rd10, %r3;
\tadd.s64 %rd11, %rd1, %rd10;
\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tsetp.lt.u32 %p1, %r1, 16;
\t@!%p1 bra $L__no_b;
\tadd.s64 %rd12, %rd2, %rd10;
\tcp.async.cg.shared.global [%r4+512], [%rd12], 16;
$L__no_b:
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tbar.sync 0;
\tand.b32 %r5, %r1, 15;
\tshr.u32 %r6, %r1, 4;
\tshl.b32 %r7, %r5, 5;
\tshl.b32 %r8, %r6, 4;
\tadd.s32 %r9, %r7, %r8;
\tadd.s32 %r9, %r9, %r2;
\tldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r10, %r11, %r12, %r13}, [%r9];
\tshl.b32 %r14, %r5, 4;
\tadd.s32 %r14, %r14, %r2;
\tldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%r15, %r16}, [%r14+512];
\tmov.f32 %f1, 0f00000000;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r10, %r11, %r12, %r13}, {%r15, %r16}, {%f1, %f1, %f1, %f1};
\tshr.u32 %r17, %r1, 2;
\tand.b32 %r18, %r1, 3;
\tshl.b32 %r18, %r18, 1;
\tmad.lo.u32 %r19, %r17, 8, %r18;
\tmul.wide.u32 %rd13, %r19, 4;
\tadd.s64 %rd14, %rd3, %rd13;
\tst.global.v2.f32 [%rd14], {%f5, %f6};
\tst.global.v2.f32 [%rd14+256], {%f7, %f8};
";
    let src = module(vars, 3, body);
    let (a, b, _) = mma_operands(16);
    let zero = vec![vec![0.0f32; 8]; 16];
    let mut mem = Mem::default();
    let a_buf = mem.add(
        a.iter()
            .flatten()
            .flat_map(|&x| half_bits(x, true))
            .collect(),
    );
    let b_buf = mem.add(
        b.iter()
            .flatten()
            .flat_map(|&x| half_bits(x, true))
            .collect(),
    );
    let d_buf = mem.out(16 * 8);
    let st = ok(&src, &mut mem, 1, 32, 768, &[a_buf, b_buf, d_buf]);
    assert_eq!((st.mma, st.barriers), (1, 1));
    assert_eq!(mem.f32s(d_buf), matmul_add(&a, &b, &zero));
}

// ---- barriers and races ------------------------------------------------------------

const SBUF: &str = ".shared .align 4 .b8 sbuf[256];\n";

/// 64 threads: thread t writes sbuf[t] = t, then `sync`, then reads
/// sbuf[(t + shift) % 64] into out[t]; `after` runs last (with %r8 = the
/// value read, %r4 = &sbuf[t]).
fn exchange(sync: &str, shift: u32, after: &str) -> String {
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, sbuf;
\tshl.b32 %r3, %r1, 2;
\tadd.s32 %r4, %r2, %r3;
\tst.shared.u32 [%r4], %r1;
\t{sync}
\tadd.s32 %r5, %r1, {shift};
\tand.b32 %r5, %r5, 63;
\tshl.b32 %r6, %r5, 2;
\tadd.s32 %r7, %r2, %r6;
\tld.shared.u32 %r8, [%r7];
{}\tst.global.u32 [%rd40], %r8;
{after}",
        thread_slot(1)
    );
    module(SBUF, 1, &body)
}

#[test]
fn barrier_orders_shared_memory_between_threads() {
    let src = exchange("bar.sync 0;", 1, "");
    let mut mem = Mem::default();
    let out = mem.out(128);
    let st = ok(&src, &mut mem, 2, 64, 0, &[out]);
    assert_eq!(st.barriers, 2, "one barrier per CTA");
    let got = mem.u32s(out);
    for g in 0..128u32 {
        assert_eq!(got[g as usize], (g % 64 + 1) % 64);
    }
    // `barrier.sync` and plain `bar.sync` with a thread count are barriers too.
    let src = exchange("barrier.sync 0;", 1, "");
    ok(&src, &mut mem, 1, 64, 0, &[out]);
}

#[test]
fn missing_barrier_is_a_race() {
    let mut mem = Mem::default();
    let out = mem.out(64);
    // Thread 0 reads sbuf[1] before thread 1 writes it: write-after-read.
    let src = exchange("", 1, "");
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "read by thread 0");
    assert_eq!(e.line, line_of(&src, "st.shared.u32 [%r4], %r1;"));
    // Thread 1 reads sbuf[0], written by thread 0: read-after-write.
    let src = exchange("", 63, "");
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "written by thread 0");
    assert_eq!(e.line, line_of(&src, "ld.shared.u32 %r8"));
}

#[test]
fn write_after_read_needs_a_barrier() {
    let mut mem = Mem::default();
    let out = mem.out(64);
    // Everyone overwrites its own slot with its neighbour's value.
    let src = exchange("bar.sync 0;", 1, "\tst.shared.u32 [%r4], %r8;\n");
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "read by thread 0");
    assert_eq!(e.line, line_of(&src, "st.shared.u32 [%r4], %r8;"));
    let src = exchange(
        "bar.sync 0;",
        1,
        "\tbar.sync 0;\n\tst.shared.u32 [%r4], %r8;\n\tbar.sync 0;\n\tld.shared.u32 %r9, [%r7];\n\
         \tst.global.u32 [%rd40], %r9;\n",
    );
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..64u32 {
        assert_eq!(got[t as usize], (t + 2) % 64, "rotated twice");
    }
}

#[test]
fn reads_by_many_threads_then_a_write() {
    let body = |sync: &str| {
        format!(
            "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, 5;
\tsetp.eq.u32 %p1, %r1, 0;
\t@%p1 st.shared.u32 [sbuf], %r2;
\tbar.sync 0;
\tld.shared.u32 %r3, [sbuf];
\t{sync}
\tsetp.eq.u32 %p2, %r1, 63;
\t@%p2 st.shared.u32 [sbuf], %r1;
{}\tst.global.u32 [%rd40], %r3;
",
            thread_slot(1)
        )
    };
    let mut mem = Mem::default();
    let out = mem.out(64);
    let src = module(SBUF, 1, &body("bar.sync 0;"));
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    assert!(mem.u32s(out).iter().all(|&v| v == 5));
    let src = module(SBUF, 1, &body(""));
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "read by other threads");
}

/// Shared atomics of many threads may meet each other, but not a plain
/// write or read of another thread in the same barrier interval (an
/// initialisation the atomics race with, a result read too early).
#[test]
fn atomics_meet_each_other_but_not_plain_accesses() {
    let body = |init_sync: &str, read_sync: &str| {
        format!(
            "\tmov.u32 %r1, %tid.x;
\tsetp.eq.u32 %p1, %r1, 0;
\t@%p1 st.shared.u32 [sbuf], 100;
\t{init_sync}
\tatom.shared.add.u32 %r2, [sbuf], %r1;
\t{read_sync}
\tld.shared.u32 %r3, [sbuf];
{}\tst.global.u32 [%rd40], %r3;
",
            thread_slot(1)
        )
    };
    let mut mem = Mem::default();
    let out = mem.out(64);
    let src = module(SBUF, 1, &body("bar.sync 0;", "bar.sync 0;"));
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    assert!(mem.u32s(out).iter().all(|&v| v == 100 + 63 * 64 / 2));
    let src = module(SBUF, 1, &body("", "bar.sync 0;"));
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "written by thread 0");
    let src = module(SBUF, 1, &body("bar.sync 0;", ""));
    let e = fails(&src, &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    assert_msg(&e, "atomically");
}

#[test]
fn two_threads_writing_one_byte_is_a_race() {
    let body = "\tmov.u32 %r1, %tid.x;\n\tst.shared.u8 [sbuf+3], %r1;\n";
    let src = module(SBUF, 1, body);
    let mut mem = Mem::default();
    let e = fails(&src, &mut mem, 1, 2, 0, &[0]);
    assert_msg(&e, "race");
    assert_msg(&e, "written by thread 0");
    assert_msg(&e, "thread (1,0,0)");
    // One thread writing and reading its own bytes needs no barrier.
    let body = "\tst.shared.u32 [sbuf], 7;\n\tld.shared.u32 %r2, [sbuf];\n\
                \tst.shared.u32 [sbuf], %r2;\n\tst.global.u32 [%rd1], %r2;\n";
    let src = module(SBUF, 1, body);
    let out = mem.out(1);
    ok(&src, &mut mem, 1, 1, 0, &[out]);
    assert_eq!(mem.u32s(out), [7]);
}

#[test]
fn syncwarp_orders_shared_memory_within_a_warp_only() {
    let mut mem = Mem::default();
    let out = mem.out(64);
    // Neighbour in the same warp: (t & ~31) | ((t + 1) & 31).
    let within = |sync: &str| {
        let body = format!(
            "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, sbuf;
\tshl.b32 %r3, %r1, 2;
\tadd.s32 %r4, %r2, %r3;
\tst.shared.u32 [%r4], %r1;
\t{sync}
\tadd.s32 %r5, %r1, 1;
\tand.b32 %r5, %r5, 31;
\tand.b32 %r6, %r1, 32;
\tor.b32 %r5, %r5, %r6;
\tshl.b32 %r6, %r5, 2;
\tadd.s32 %r7, %r2, %r6;
\tld.shared.u32 %r8, [%r7];
\t{sync}
\tst.shared.u32 [%r4], %r8;
{}\tst.global.u32 [%rd40], %r8;
",
            thread_slot(1)
        );
        module(SBUF, 1, &body)
    };
    ok(&within("bar.warp.sync -1;"), &mut mem, 1, 64, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..64u32 {
        assert_eq!(got[t as usize], (t & !31) | ((t + 1) & 31));
    }
    let e = fails(&within(""), &mut mem, 1, 64, 0, &[out]);
    assert_msg(&e, "race");
    // Across warps a warp barrier orders nothing.
    let e = fails(
        &exchange("bar.warp.sync -1;", 32, ""),
        &mut mem,
        1,
        64,
        0,
        &[out],
    );
    assert_msg(&e, "race");
}

#[test]
fn bar_red_reductions() {
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tsetp.eq.u32 %p1, %r1, 5;
\tbar.red.or.pred %p2, 0, %p1;
\tsetp.gt.u32 %p3, %r1, 1000;
\tbar.red.or.pred %p4, 0, %p3;
\tbar.red.and.pred %p5, 0, !%p3;
\tbar.red.and.pred %p6, 0, !%p1;
\trem.u32 %r2, %r1, 3;
\tsetp.eq.u32 %p7, %r2, 0;
\tbar.red.popc.u32 %r3, 0, %p7;
\tbarrier.red.or.pred %p8, 0, %p1;
\tselp.u32 %r4, 1, 0, %p2;
\tselp.u32 %r5, 1, 0, %p4;
\tselp.u32 %r6, 1, 0, %p5;
\tselp.u32 %r7, 1, 0, %p6;
\tselp.u32 %r8, 1, 0, %p8;
{}{}",
        thread_slot(6),
        store_words("%rd40", &["%r4", "%r5", "%r6", "%r7", "%r3", "%r8"])
    );
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let out = mem.out(6 * 70);
    let st = ok(&src, &mut mem, 1, 70, 0, &[out]);
    assert_eq!(st.barriers, 6);
    let got = mem.u32s(out);
    let popc = (0..70).filter(|t| t % 3 == 0).count() as u32;
    for t in 0..70usize {
        assert_eq!(got[6 * t..6 * t + 6], [1, 0, 1, 0, popc, 1], "thread {t}");
    }
}

#[test]
fn threads_that_exit_do_not_block_a_barrier() {
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tsetp.ge.u32 %p1, %r1, 40;
\t@%p1 ret;
\tbar.sync 0;
{}\tst.global.u32 [%rd40], %r1;
",
        thread_slot(1)
    );
    let src = module("", 1, &body);
    let mut mem = Mem::default();
    let out = mem.out(64);
    ok(&src, &mut mem, 1, 64, 0, &[out]);
    let got = mem.u32s(out);
    for t in 0..64u32 {
        assert_eq!(got[t as usize], if t < 40 { t } else { SENTINEL });
    }
}

#[test]
fn deadlocks_and_divergent_collectives_are_errors() {
    let mut mem = Mem::default();
    let cases = [
        // Half a warp at a barrier, the other half at a shuffle.
        (
            32,
            "\tmov.u32 %r1, %tid.x;
\tsetp.lt.u32 %p1, %r1, 16;
\t@%p1 bra $L__a;
\tshfl.sync.bfly.b32 %r2, %r1, 1, 0x1f, -1;
\tbra.uni $L__end;
$L__a:
\tbar.sync 0;
$L__end:
",
        ),
        // Two halves of a warp at different shuffles.
        (
            32,
            "\tmov.u32 %r1, %tid.x;
\tsetp.lt.u32 %p1, %r1, 16;
\t@%p1 bra $L__a;
\tshfl.sync.bfly.b32 %r2, %r1, 1, 0x1f, -1;
\tbra.uni $L__end;
$L__a:
\tshfl.sync.bfly.b32 %r2, %r1, 2, 0x1f, -1;
$L__end:
",
        ),
        // Warp 0 loops at barrier 0; warp 1 passes it once, shuffles and
        // waits at barrier 1.
        (
            64,
            "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r3, 0;
\tsetp.ge.u32 %p1, %r1, 32;
$L__loop:
\tbar.sync 0;
\t@%p1 bra $L__other;
\tadd.s32 %r3, %r3, 1;
\tsetp.lt.u32 %p2, %r3, 2;
\t@%p2 bra $L__loop;
\tbra.uni $L__end;
$L__other:
\tshfl.sync.bfly.b32 %r2, %r1, 1, 0x1f, -1;
\tbar.sync 1;
$L__end:
",
        ),
        // Warps at different named barriers.
        (
            64,
            "\tmov.u32 %r1, %tid.x;
\tsetp.lt.u32 %p1, %r1, 32;
\t@%p1 bra $L__a;
\tbar.sync 1;
\tbra.uni $L__end;
$L__a:
\tbar.sync 0;
$L__end:
",
        ),
        // A barrier and a barrier reduction.
        (
            64,
            "\tmov.u32 %r1, %tid.x;
\tsetp.lt.u32 %p1, %r1, 32;
\t@%p1 bra $L__a;
\tbar.red.or.pred %p2, 0, %p1;
\tbra.uni $L__end;
$L__a:
\tbar.sync 0;
$L__end:
",
        ),
        // ldmatrix with half the warp gone.
        (
            32,
            "\tmov.u32 %r1, %tid.x;
\tsetp.lt.u32 %p1, %r1, 16;
\t@%p1 ret;
\tmov.u32 %r2, sbuf;
\tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r3}, [%r2];
",
        ),
    ];
    for (i, (threads, body)) in cases.into_iter().enumerate() {
        let src = module(SBUF, 1, body);
        let Err(e) = launch(&src, &mut mem, (1, 1, 1), (threads, 1, 1), 0, &[0]) else {
            panic!("case {i}: expected an error from\n{body}");
        };
        assert!(e.line > 0, "{e}");
        assert!(
            e.msg.contains("deadlock")
                || e.msg.contains("inactive lanes")
                || e.msg.contains("barrier"),
            "{e}\n{body}"
        );
    }
}

#[test]
fn one_barrier_id_met_at_two_instructions() {
    // PTX barriers are named by id, not by instruction.
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tst.shared.u32 [sbuf], %r1;
\tsetp.eq.u32 %p1, %r1, 0;
\t@%p1 bra $L__a;
\tbar.sync 0;
\tbra.uni $L__end;
$L__a:
\tst.shared.u32 [sbuf], %r1;
\tbar.sync 0;
$L__end:
\tld.shared.u32 %r2, [sbuf];
{}\tst.global.u32 [%rd40], %r2;
",
        thread_slot(1)
    );
    let src = module(
        SBUF,
        1,
        &body.replace("\tst.shared.u32 [sbuf], %r1;\n\tsetp", "\tsetp"),
    );
    let mut mem = Mem::default();
    let out = mem.out(64);
    let st = ok(&src, &mut mem, 1, 64, 0, &[out]);
    assert_eq!(st.barriers, 1);
    assert!(mem.u32s(out).iter().all(|&v| v == 0));
}

// ---- cp.async ---------------------------------------------------------------------------

const CP_VARS: &str = ".shared .align 16 .b8 sbuf[256];\n";

/// Thread t: %r4 = &sbuf[16 t] (shared), %rd11 = in + 16 t.
const CP_SETUP: &str = "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, sbuf;
\tshl.b32 %r3, %r1, 4;
\tadd.s32 %r4, %r2, %r3;
\tcvt.u64.u32 %rd10, %r3;
\tadd.s64 %rd11, %rd1, %rd10;
";

#[test]
fn cp_async_lands_at_wait_group() {
    // Eight threads copy 16 bytes each, wait, sync, and read their
    // neighbour's 16 bytes.
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tbar.sync 0;
\tadd.s32 %r5, %r1, 1;
\tand.b32 %r5, %r5, 7;
\tshl.b32 %r6, %r5, 4;
\tadd.s32 %r7, %r2, %r6;
\tld.shared.v4.u32 {{%r10, %r11, %r12, %r13}}, [%r7];
\tmul.wide.u32 %rd12, %r1, 16;
\tadd.s64 %rd13, %rd2, %rd12;
\tst.global.v4.u32 [%rd13], {{%r10, %r11, %r12, %r13}};
"
    );
    let src = module(CP_VARS, 2, &body);
    let mut mem = Mem::default();
    let input: Vec<u32> = (0..32).map(|i| i * 3 + 1).collect();
    let inp = mem.words(&input);
    let out = mem.out(32);
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    let got = mem.u32s(out);
    for t in 0..8 {
        let u = (t + 1) % 8;
        assert_eq!(got[4 * t..4 * t + 4], input[4 * u..4 * u + 4], "thread {t}");
    }
    // cp.async.wait_all and the .ca (4- and 8-byte) forms work the same.
    let body = format!(
        "{CP_SETUP}\tcp.async.ca.shared.global [%r4], [%rd11], 4;
\tcp.async.ca.shared.global [%r4+8], [%rd11+8], 8;
\tcp.async.wait_all;
\tld.shared.u32 %r10, [%r4];
\tld.shared.v2.u32 {{%r11, %r12}}, [%r4+8];
\tld.shared.u32 %r13, [%r4+4];
\tmul.wide.u32 %rd12, %r1, 16;
\tadd.s64 %rd13, %rd2, %rd12;
\tst.global.v4.u32 [%rd13], {{%r10, %r11, %r12, %r13}};
"
    );
    let src = module(CP_VARS, 2, &body);
    let out = mem.out(32);
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    let got = mem.u32s(out);
    for t in 0..8 {
        let i = &input[4 * t..4 * t + 4];
        assert_eq!(
            got[4 * t..4 * t + 4],
            [i[0], i[2], i[3], u32::MAX],
            "thread {t}"
        );
    }
}

#[test]
fn reading_a_cp_async_destination_before_the_wait_is_an_error() {
    let mut mem = Mem::default();
    let inp = mem.words(&[7; 32]);
    let out = mem.out(32);
    // The issuing thread itself, before its wait_group.
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tcp.async.commit_group;
\tld.shared.u32 %r10, [%r4+12];
\tcp.async.wait_group 0;
"
    );
    let src = module(CP_VARS, 2, &body);
    let e = fails(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert_msg(&e, "in flight");
    assert_eq!(e.line, line_of(&src, "ld.shared.u32 %r10"));
    // Another thread after a barrier, the issuer never having waited.
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tcp.async.commit_group;
\tbar.sync 0;
\tld.shared.u32 %r10, [sbuf+16];
\tcp.async.wait_group 0;
"
    );
    let src = module(CP_VARS, 2, &body);
    let e = fails(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert_msg(&e, "in flight");
    // Overwriting bytes in flight.
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tst.shared.u32 [%r4], %r1;
\tcp.async.wait_all;
"
    );
    let src = module(CP_VARS, 2, &body);
    let e = fails(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert_msg(&e, "in flight");
}

#[test]
fn wait_group_n_leaves_the_newest_n_groups_in_flight() {
    let mut mem = Mem::default();
    let inp = mem.words(&(0..64).collect::<Vec<u32>>());
    let out = mem.out(2);
    let body = |second_read: &str| {
        format!(
            "\tmov.u32 %r2, sbuf;
\tcp.async.cg.shared.global [%r2], [%rd1], 16;
\tcp.async.commit_group;
\tcp.async.cg.shared.global [%r2+16], [%rd1+16], 16;
\tcp.async.commit_group;
\tcp.async.wait_group 1;
\tld.shared.u32 %r10, [%r2+4];
\tst.global.u32 [%rd2], %r10;
{second_read}"
        )
    };
    let src = module(CP_VARS, 2, &body("\tld.shared.u32 %r11, [%r2+16];\n"));
    let e = fails(&src, &mut mem, 1, 1, 0, &[inp, out]);
    assert_msg(&e, "in flight");
    assert_eq!(e.line, line_of(&src, "ld.shared.u32 %r11"));
    assert_eq!(mem.u32s(out)[0], 1, "the older group landed");
    let src = module(
        CP_VARS,
        2,
        &body("\tcp.async.wait_group 0;\n\tld.shared.u32 %r11, [%r2+20];\n\tst.global.u32 [%rd2+4], %r11;\n"),
    );
    ok(&src, &mut mem, 1, 1, 0, &[inp, out]);
    assert_eq!(mem.u32s(out), [1, 5]);
}

#[test]
fn cp_async_src_size_zero_fills() {
    let mut mem = Mem::default();
    // Thread t copies from in + 16 t; the last thread's 16 bytes would
    // reach past the end of `in`, its first 8 do not.
    let input: Vec<u32> = (0..30).map(|i| 0x100 + i).collect();
    let inp = mem.words(&input);
    let out = mem.out(4 * 8);
    let body = "\tmov.u32 %r1, %tid.x;
\tmov.u32 %r2, sbuf;
\tshl.b32 %r3, %r1, 4;
\tadd.s32 %r4, %r2, %r3;
\tmul.wide.u32 %rd10, %r1, 16;
\tadd.s64 %rd11, %rd1, %rd10;
\tmov.u32 %r9, 8;
\tcp.async.cg.shared.global [%r4], [%rd11], 16, %r9;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r4];
\tmul.wide.u32 %rd12, %r1, 16;
\tadd.s64 %rd13, %rd2, %rd12;
\tst.global.v4.u32 [%rd13], {%r10, %r11, %r12, %r13};
";
    let src = module(CP_VARS, 2, body);
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    let got = mem.u32s(out);
    for t in 0..8 {
        assert_eq!(
            got[4 * t..4 * t + 4],
            [input[4 * t], input[4 * t + 1], 0, 0],
            "thread {t}"
        );
    }
    // An immediate src-size of 4.
    let src = module(CP_VARS, 2, &body.replace("16, %r9;", "16, 4;"));
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    let got = mem.u32s(out);
    for t in 0..8 {
        assert_eq!(got[4 * t..4 * t + 4], [input[4 * t], 0, 0, 0], "thread {t}");
    }
    // src-size 0 reads nothing: an invalid, misaligned source is fine.
    let src = module(
        CP_VARS,
        2,
        &body
            .replace("add.s64 %rd11, %rd1, %rd10;", "mov.u64 %rd11, 0x1235;")
            .replace("16, %r9;", "16, 0;"),
    );
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert!(mem.u32s(out).iter().all(|&w| w == 0));
    // The ignore-src predicate form: true reads nothing, false copies.
    let pred = body
        .replace("mov.u32 %r9, 8;", "setp.eq.u32 %p1, %r1, 7;")
        .replace("16, %r9;", "16, %p1;");
    let src = module(CP_VARS, 2, &pred);
    ok(&src, &mut mem, 1, 8, 0, &[inp, out]);
    let got = mem.u32s(out);
    assert_eq!(got[..28], input[..28]);
    assert_eq!(got[28..], [0, 0, 0, 0]);
    // A src-size that is not a valid source still fails when it is read.
    let src = module(
        CP_VARS,
        2,
        &body.replace("mov.u32 %r9, 8;", "mov.u32 %r9, 12;"),
    );
    let e = fails(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert_msg(&e, "outside");
}

// ---- bounds ---------------------------------------------------------------------------

#[test]
fn out_of_bounds_and_misaligned_accesses_are_errors() {
    let mut mem = Mem::default();
    let buf = mem.words(&[1, 2, 3, 4]);
    let cases: &[(&str, &str, &str)] = &[
        ("\tst.shared.u32 [sbuf+256], %r1;\n", "st.shared", "outside"),
        ("\tld.shared.u32 %r2, [sbuf+256];\n", "ld.shared", "outside"),
        (
            "\tmov.u32 %r3, -4;\n\tld.shared.u32 %r2, [%r3];\n",
            "ld.shared",
            "outside",
        ),
        (
            "\tmov.u64 %rd3, -4;\n\tst.shared.u32 [%rd3], %r1;\n",
            "st.shared",
            "outside",
        ),
        ("\tld.global.u32 %r2, [%rd1+16];\n", "ld.global", "outside"),
        ("\tst.global.u32 [%rd1+-4], %r1;\n", "st.global", "unmapped"),
        (
            "\tmov.u64 %rd3, 0;\n\tld.global.u32 %r2, [%rd3];\n",
            "ld.global",
            "unmapped",
        ),
        (
            "\tld.global.v2.u32 {%r2, %r3}, [%rd1+4];\n",
            "ld.global",
            "misaligned",
        ),
        (
            "\tst.global.v4.u32 [%rd1+8], {%r1, %r1, %r1, %r1};\n",
            "st.global",
            "misaligned",
        ),
        (
            "\tld.global.u32 %r2, [%rd1+2];\n",
            "ld.global",
            "misaligned",
        ),
        (
            "\tld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd1+16];\n",
            "ld.global",
            "outside",
        ),
        (
            "\tmov.u32 %r3, sbuf;\n\tadd.s32 %r3, %r3, 8;\n\
             \tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r2}, [%r3];\n",
            "ldmatrix",
            "aligned",
        ),
        (
            "\tmov.u32 %r3, sbuf;\n\tadd.s32 %r3, %r3, 256;\n\
             \tldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r2}, [%r3];\n",
            "ldmatrix",
            "outside",
        ),
        (
            "\tmov.u32 %r3, sbuf;\n\tcp.async.cg.shared.global [%r3+256], [%rd1], 16;\n",
            "cp.async",
            "outside",
        ),
        (
            "\tmov.u32 %r3, sbuf;\n\tcp.async.cg.shared.global [%r3+8], [%rd1], 16;\n",
            "cp.async",
            "misaligned",
        ),
        (
            "\tmov.u32 %r3, sbuf;\n\tcp.async.cg.shared.global [%r3], [%rd1+8], 16;\n",
            "cp.async",
            "misaligned",
        ),
        ("\tdiv.u32 %r2, %r1, 0;\n", "div.u32", "division by zero"),
    ];
    for (body, at, what) in cases {
        let body = format!("\tmov.u32 %r1, %tid.x;\n{body}");
        let src = module(SBUF, 1, &body);
        let e = fails(&src, &mut mem, 1, 32, 0, &[buf]);
        assert_msg(&e, what);
        assert_eq!(e.line, line_of(&src, at), "{e}");
    }
}

// ---- parse and launch errors -----------------------------------------------------------

fn parse_err(src: &str) -> SimError {
    match Module::parse(src) {
        Ok(_) => panic!("expected a parse error from\n{src}"),
        Err(e) => e,
    }
}

#[test]
fn parse_errors_name_their_line() {
    let cases: &[(&str, &str, &str)] = &[
        ("\tfoo.bar.u32 %r1, %r2;\n", "foo.bar", "not supported"),
        ("\tld.u32 %r1, [%rd1];\n", "ld.u32", "generic"),
        ("\tst.u32 [%rd1], %r1;\n", "st.u32", "generic"),
        ("\tadd.s32 %r1, %r2, %q7;\n", "%q7", "unknown name `%q7`"),
        ("\t@%q1 bra $L__x;\n", "@%q1", "unknown predicate"),
        ("\tbra.uni $L__nowhere;\n", "$L__nowhere", "unknown label"),
        (
            "\t.local .align 4 .b8 stack[16];\n",
            ".local",
            "not supported",
        ),
        (
            "\tsetp.foo.s32 %p1, %r1, %r2;\n",
            "setp.foo",
            "not supported",
        ),
        (
            "\tmov.u32 %r1, # 3;\n",
            "mov.u32 %r1, #",
            "unexpected character",
        ),
        (
            "\tadd.s32 %r1, %r2 %r3;\n",
            "add.s32 %r1, %r2 %r3",
            "expected `,`",
        ),
        ("\tadd.s32 %r1, %r2;\n", "add.s32 %r1, %r2;", "operand"),
        ("\tbra.uni;\n", "bra.uni;", "operand"),
        (
            "\tshfl.sync.bfly.b32 %r1, %r2, 1;\n",
            "shfl.sync",
            "operand",
        ),
        (
            "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1};\n",
            "mma.sync",
            "operand",
        ),
    ];
    for (body, at, what) in cases {
        let src = module("", 1, body);
        let e = parse_err(&src);
        assert!(e.line > 0, "{e}");
        assert_eq!(e.line, line_of(&src, at), "{e}\n{src}");
        assert_msg(&e, what);
    }
}

#[test]
fn unsupported_module_constructs_are_parse_errors() {
    let func =
        format!("{HEADER}.visible .func (.param .b32 ret) f(.param .b32 a)\n{{\n\tret;\n}}\n");
    let e = parse_err(&func);
    assert_msg(&e, ".func");
    assert_eq!(e.line, line_of(&func, ".func"));
    let func = format!("{HEADER}.func f()\n{{\n\tret;\n}}\n");
    let e = parse_err(&func);
    assert_msg(&e, ".func");
    assert_eq!(e.line, line_of(&func, ".func"));
    let comment = format!("{HEADER}/* never closed\n.visible .entry k()\n{{\n}}\n");
    let e = parse_err(&comment);
    assert_msg(&e, "unterminated comment");
    let array_param =
        format!("{HEADER}.visible .entry k(.param .align 4 .b8 k_param_0[16])\n{{\n\tret;\n}}\n");
    let e = parse_err(&array_param);
    assert_eq!(e.line, line_of(&array_param, ".entry"));
    let truncated = format!("{HEADER}.visible .entry k(.param .u64 k_param_0)\n{{\n\tret;\n");
    parse_err(&truncated);
    let bad_top = format!("{HEADER}.visible .entry k()\n{{\n\tret;\n}}\nbogus;\n");
    let e = parse_err(&bad_top);
    assert_eq!(e.line, line_of(&bad_top, "bogus"));
}

#[test]
fn launch_errors() {
    let src = module("", 2, "");
    let m = parse(&src);
    let mut mem = Mem::default();
    let e = m
        .launch(&mut mem, "nope", (1, 1, 1), (1, 1, 1), 0, &[0, 0])
        .unwrap_err();
    assert_msg(&e, "no kernel `nope`");
    let e = m
        .launch(&mut mem, "k", (1, 1, 1), (1, 1, 1), 0, &[0])
        .unwrap_err();
    assert_msg(&e, "takes 2 parameters");
    // ld.param past a parameter's bytes.
    let src = module("", 1, "\tld.param.u32 %r1, [k_param_0+8];\n");
    let e = fails(&src, &mut mem, 1, 1, 0, &[0]);
    assert_eq!(e.line, line_of(&src, "k_param_0+8"));
}

#[test]
fn launch_stats_count_the_work() {
    let src = exchange("bar.sync 0;", 1, "");
    let mut mem = Mem::default();
    let out = mem.out(3 * 64);
    let st = ok(&src, &mut mem, 3, 64, 0, &[out]);
    assert_eq!(st.ctas, 3);
    assert_eq!(st.barriers, 3);
    assert_eq!(st.mma, 0);
    assert_eq!(st.smem_bytes, 256);
    // Every thread runs the same straight-line code: a multiple of 192.
    assert!(
        st.instructions > 0 && st.instructions.is_multiple_of(192),
        "{st:?}"
    );
}

// ---- atomics, module structure -----------------------------------------------------------

#[test]
fn atomics_and_reductions() {
    let vars = ".shared .align 4 .b8 sbuf[16];\n";
    let body = format!(
        "\tmov.u32 %r1, %tid.x;
\tsetp.eq.u32 %p1, %r1, 0;
\tmov.u32 %r2, 0;
\t@%p1 st.shared.u32 [sbuf], %r2;
\tbar.sync 0;
\tatom.shared.add.u32 %r3, [sbuf], 1;
\tbar.sync 0;
\tld.shared.u32 %r4, [sbuf];
\tsub.s32 %r5, %r1, 32;
\tatom.global.max.s32 %r6, [%rd2], %r5;
\tatom.global.min.s32 %r6, [%rd2+4], %r5;
\tadd.s32 %r7, %r1, 1;
\tatom.global.cas.b32 %r8, [%rd2+8], 0, %r7;
\tatom.global.exch.b32 %r9, [%rd2+12], %r7;
\tred.global.add.f32 [%rd2+16], 0f3F000000;
\tatom.global.add.u32 %r10, [%rd2+20], 2;
{}{}",
        thread_slot(3),
        store_words("%rd40", &["%r3", "%r4", "%r8"])
    );
    let src = module(vars, 2, &body);
    let mut mem = Mem::default();
    let out = mem.out(3 * 64);
    let acc = mem.words(&[i32::MIN as u32, i32::MAX as u32, 0, 0, 0, 10]);
    ok(&src, &mut mem, 1, 64, 0, &[out, acc]);
    let got = mem.u32s(out);
    let mut olds: Vec<u32> = (0..64).map(|t| got[3 * t]).collect();
    olds.sort_unstable();
    assert_eq!(
        olds,
        (0..64).collect::<Vec<u32>>(),
        "atom.add returns distinct old values"
    );
    assert!(
        (0..64).all(|t| got[3 * t + 1] == 64),
        "the counter reached 64"
    );
    // cas: only the first thread finds 0.
    assert_eq!(got[2], 0);
    assert!((1..64).all(|t| got[3 * t + 2] == 1));
    let a = mem.u32s(acc);
    assert_eq!(a[0] as i32, 31);
    assert_eq!(a[1] as i32, -32);
    assert_eq!(a[2], 1);
    assert_eq!(a[3], 64, "the last exchange wins");
    assert_eq!(f32::from_bits(a[4]), 32.0);
    assert_eq!(a[5], 10 + 128);
}

#[test]
fn several_kernels_comments_and_directives() {
    let src = format!(
        "{HEADER}// a comment
/* a block
   comment */
.visible .entry first(.param .u64 first_param_0)
.maxntid 64, 1, 1
{{
{REGS}\tld.param.u64 %rd1, [first_param_0];
\tmov.u32 %r1, 11; // trailing comment
\t.pragma \"nounroll\";
\tst.global.u32 [%rd1], %r1;
\tret;
}}

.visible .entry second(.param .u64 second_param_0)
{{
{REGS}\tld.param.u64 %rd1, [second_param_0];
\tmov.u32 %r1, 22;
\tst.global.u32 [%rd1+4], %r1;
\tfoo.bar;
}}
"
    );
    // The unknown opcode in `second` is an error for the whole module...
    let e = parse_err(&src);
    assert_eq!(e.line, line_of(&src, "foo.bar"));
    // ...without it both kernels run.
    let src = src.replace("\tfoo.bar;\n", "\tret;\n");
    let m = parse(&src);
    assert_eq!(m.kernels.len(), 2);
    let mut mem = Mem::default();
    let out = mem.out(2);
    m.launch(&mut mem, "first", (1, 1, 1), (1, 1, 1), 0, &[out])
        .unwrap();
    assert_eq!(mem.u32s(out), [11, SENTINEL]);
    m.launch(&mut mem, "second", (1, 1, 1), (1, 1, 1), 0, &[out])
        .unwrap();
    assert_eq!(mem.u32s(out), [11, 22]);
}

#[test]
fn malformed_collectives_are_errors_not_panics() {
    let mut mem = Mem::default();
    // mma with three A registers (m16n8k16 takes four).
    let body = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, \
                {%r1, %r2, %r3}, {%r4, %r5}, {%f1, %f2, %f3, %f4};\n";
    let src = module("", 1, body);
    let e = fails(&src, &mut mem, 1, 32, 0, &[0]);
    assert_msg(&e, "operand counts");
    // An f16 accumulator is not simulated.
    let body = "\tmma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%r6, %r7}, \
                {%r1, %r2, %r3, %r4}, {%r4, %r5}, {%r6, %r7};\n";
    let src = module("", 1, body);
    let e = fails(&src, &mut mem, 1, 32, 0, &[0]);
    assert_msg(&e, "only f32");
    // ldmatrix into a scalar.
    let body = "\tmov.u32 %r1, sbuf;\n\tldmatrix.sync.aligned.m8n8.x1.shared.b16 %r2, [%r1];\n";
    let src = module(SBUF, 1, body);
    let e = fails(&src, &mut mem, 1, 32, 0, &[0]);
    assert_msg(&e, "not a vector");
}

#[test]
fn exiting_with_copies_in_flight_is_an_error_but_empty_groups_are_not() {
    let mut mem = Mem::default();
    let inp = mem.words(&[7; 32]);
    let out = mem.out(32);
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tcp.async.commit_group;
"
    );
    let src = module(CP_VARS, 2, &body);
    let e = fails(&src, &mut mem, 1, 8, 0, &[inp, out]);
    assert_msg(&e, "copies in flight");
    // Waited for, then only an empty group outstanding: fine.
    let body = format!(
        "{CP_SETUP}\tcp.async.cg.shared.global [%r4], [%rd11], 16;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tcp.async.commit_group;
"
    );
    ok(&module(CP_VARS, 2, &body), &mut mem, 1, 8, 0, &[inp, out]);
}
