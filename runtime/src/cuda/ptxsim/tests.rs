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
            ("mad.wide.s32 %rd10, %r2, %r1, %rd20;", U64(0x1_0000_0005 - 21)),
            ("mul.lo.u64 %rd10, %rd20, %rd20;", U64(0xa_0000_0019)),
            ("add.s64 %rd10, %rd20, -6;", U64(0xffff_ffff)),
            ("sub.s64 %rd10, 0, %rd20;", U64(0x1_0000_0005u64.wrapping_neg())),
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
            ("fma.rn.f32 %f10, %f5, %f5, %f6;", F32(f32::from_bits(0x3380_0000))),
            ("mul.rn.f32 %f11, %f5, %f5;\n\tadd.rn.f32 %f10, %f11, %f6;", F32(0.0)),
            // 1 + 2^-24 is a tie: nearest even, or directed.
            ("add.f32 %f10, %f8, %f7;", F32(1.0)),
            ("add.rz.f32 %f10, %f8, %f7;", F32(1.0)),
            ("add.rp.f32 %f10, %f8, %f7;", F32(f32::from_bits(0x3f80_0001))),
            ("add.rm.f32 %f10, 0fBF800000, 0fB3800000;", F32(f32::from_bits(0xbf80_0001))),
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
            ("cvt.rn.f32.u64 %f10, %rd22;", F32(f32::from_bits(0x5d80_0001))),
            ("cvt.rn.f32.s64 %f10, %rd23;", F32(f32::from_bits(0xdd80_0001))),
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
            ("cvt.rn.f32.f64 %f10, %fd1;", F32(f32::from_bits(0x3f80_0001))),
            ("cvt.rz.f32.f64 %f10, %fd1;", F32(1.0)),
            ("add.f64 %fd2, %fd1, %fd1;\n\tcvt.rn.f32.f64 %f10, %fd2;", F32(f32::from_bits(0x4000_0001))),
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
