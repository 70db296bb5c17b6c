//! Compile-time choices of a kernel: the target (arch, dtype) and the tile
//! configuration. Everything here is baked into the generated source; shapes
//! users vary (sequence length, batch, segment ids, ranges) are not.

use crate::CodegenError;
use mixc_dsl::ir::{DType, Family, MixerSpec};
use serde::{Deserialize, Serialize};
use std::fmt;

/// GPU architecture the source is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    Sm80,
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// NVRTC / ptxas name, e.g. `sm_90`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// Compute capability as a number (80, 90).
    pub fn compute_capability(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
        }
    }

    /// Most dynamic shared memory one block may opt into
    /// (`cudaFuncAttributeMaxDynamicSharedMemorySize`).
    pub fn max_dynamic_smem_bytes(self) -> u32 {
        match self {
            Arch::Sm80 => 163 * 1024,
            Arch::Sm90 => 227 * 1024,
        }
    }

    /// Dynamic shared memory a launch may use without setting the attribute.
    pub const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

    pub fn parse(s: &str) -> Result<Arch, CodegenError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sm_80" | "sm80" | "80" => Ok(Arch::Sm80),
            "sm_90" | "sm90" | "90" => Ok(Arch::Sm90),
            other => Err(CodegenError::InvalidTarget(format!(
                "unknown architecture `{other}`; expected sm_80 or sm_90"
            ))),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the source is generated for. `dtype` is the storage type of q, k, v
/// and the output; it usually equals the spec's dtype but may be overridden
/// (e.g. to build the f32 SIMT path of a bf16 spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    pub arch: Arch,
    pub dtype: DType,
}

impl Target {
    pub fn new(arch: Arch, dtype: DType) -> Self {
        Target { arch, dtype }
    }
    /// The spec's own dtype on `arch`.
    pub fn for_spec(spec: &MixerSpec, arch: Arch) -> Self {
        Target {
            arch,
            dtype: spec.dtype,
        }
    }
    /// f16/bf16 use tensor cores (mma.sync); f32 uses the SIMT path.
    pub fn uses_tensor_cores(&self) -> bool {
        matches!(self.dtype, DType::F16 | DType::Bf16)
    }
}

/// Tile configuration. Not every field matters to every family: the softmax
/// kernel reads `block_m`, `block_n`, `warps`, `stages`; the chunkwise kernels
/// read `chunk`, `warps`, `block_dv`; the convolution kernel reads `block_m`,
/// `block_n`, `warps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KernelConfig {
    /// Query rows per CTA.
    pub block_m: u32,
    /// Key rows per inner-loop tile.
    pub block_n: u32,
    /// Warps per CTA.
    pub warps: u32,
    /// Shared-memory pipeline depth for K/V tiles (1 = no overlap, 2 = double buffering).
    pub stages: u32,
    /// Chunk length of the chunkwise (state-passing) families.
    pub chunk: u32,
    /// Value columns per CTA for families that split d_v across the grid (0 = all of d_v).
    pub block_dv: u32,
}

/// Keys accepted by [`KernelConfig::set`], in the order they are documented.
pub const CONFIG_KEYS: [&str; 6] = ["block_m", "block_n", "warps", "stages", "chunk", "block_dv"];

impl KernelConfig {
    /// The default for a spec on a target: chosen so the kernel fits without
    /// spills on sm_90 (see the NVRTC tests, which check exactly that).
    pub fn default_for(spec: &MixerSpec, target: &Target) -> KernelConfig {
        let widest = spec.head_dim.max(spec.value_dim);
        match spec.family {
            Family::Softmax if target.uses_tensor_cores() => {
                // Each warp holds block_m / warps rows of an f32 d_v-wide
                // accumulator: narrow heads afford 32 rows a warp (K/V
                // fragments then serve two row fragments), wide heads need a
                // smaller score tile to stay under 255 registers and in smem.
                // Extra inputs (tables, segment ids) cost registers of their own.
                let lean = spec.inputs.is_empty();
                let (block_m, block_n) = match widest {
                    0..=64 if lean => (128, 64),
                    0..=64 => (64, 64),
                    65..=128 => (64, 64),
                    _ => (64, 32),
                };
                KernelConfig {
                    block_m,
                    block_n,
                    warps: 4,
                    stages: 2,
                    chunk: 64,
                    block_dv: 0,
                }
            }
            Family::Softmax => KernelConfig {
                block_m: 32,
                block_n: 32,
                warps: 4,
                stages: 1,
                chunk: 64,
                block_dv: 0,
            },
            Family::Linear | Family::Retention | Family::Gated => {
                crate::lower_chunkwise::default_config(spec, target)
            }
            Family::Convolution => crate::lower_conv::default_config(spec, target),
        }
    }

    /// The default tile configuration of the backward kernel
    /// ([`crate::generate_backward`]): `block_n` keys per CTA, `block_m`
    /// query rows per step, `warps` = `block_n / 16` key fragments times the
    /// parts the dK / dV columns are split into, so each thread keeps about
    /// 64 to 128 f32 accumulators at any head size.
    pub fn backward_default_for(spec: &MixerSpec, _target: &Target) -> KernelConfig {
        // A bias or transform adds its derivative (and a table's gradient
        // atomics) to each thread's state: at d = 64, four warps then need
        // more than 255 registers and spill 48-96 bytes (a T5 table with a
        // transform, measured with NVRTC); eight warps hold the same
        // 64 x 64 tile in ~215 without spilling. Eight warps pair up on a
        // key fragment, each taking half of the (16-padded) widths, so
        // they need widths that halve into multiples of 16.
        let halves = |d: u32| round_up(d, 16).is_multiple_of(32);
        let score_expr = spec.bias.is_some() || spec.transform.is_some();
        let eight = score_expr && halves(spec.head_dim) && halves(spec.value_dim);
        let (block_m, block_n, warps) = match spec.head_dim.max(spec.value_dim) {
            0..=64 if eight => (64, 64, 8),
            0..=64 => (64, 64, 4),
            65..=128 => (64, 64, 8),
            _ => (64, 32, 8),
        };
        KernelConfig {
            block_m,
            block_n,
            warps,
            stages: 1,
            chunk: 64,
            block_dv: 0,
        }
    }

    /// Alternative tile configurations worth trying (autotuning candidates,
    /// compile tests), as overrides of the default. Not every one fits every
    /// spec: [`crate::candidate_configs`] keeps those that generate.
    pub fn alternatives(spec: &MixerSpec, target: &Target) -> &'static [&'static str] {
        let wide = spec.head_dim.max(spec.value_dim) > 128;
        match (spec.family, target.uses_tensor_cores()) {
            (Family::Softmax, true) if wide => &[
                "block_m=128,warps=8",
                "stages=1",
                "block_m=32,warps=2",
                "block_n=64,stages=1",
            ],
            (Family::Softmax, true)
                if spec.head_dim.max(spec.value_dim) <= 64 && spec.inputs.is_empty() =>
            {
                &[
                    "block_m=64",
                    "block_n=32,stages=3",
                    "block_m=128,warps=8",
                    "block_n=128,stages=1",
                ]
            }
            (Family::Softmax, true) => &[
                "block_m=128,warps=8",
                "block_m=128,block_n=32",
                "block_n=32,stages=3",
                "block_n=128,stages=1",
            ],
            (Family::Softmax, false) => &[
                "block_m=64,warps=8",
                "block_m=64,warps=4,block_n=16",
                "block_m=16,warps=2",
            ],
            // Chunkwise / convolution: a broad list; their lowering rejects what does not fit.
            _ => &[
                "chunk=32",
                "chunk=128",
                "chunk=16",
                "block_m=128,warps=8",
                "block_n=32",
                "block_m=32,warps=2",
                "block_dv=32",
                "block_dv=128",
                "stages=1",
                "stages=2",
            ],
        }
    }

    /// Sets one field by name (`block_m`, `block_n`, `warps`, `stages`, `chunk`, `block_dv`).
    pub fn set(&mut self, key: &str, value: u32) -> Result<(), CodegenError> {
        let slot = match key {
            "block_m" => &mut self.block_m,
            "block_n" => &mut self.block_n,
            "warps" => &mut self.warps,
            "stages" => &mut self.stages,
            "chunk" => &mut self.chunk,
            "block_dv" => &mut self.block_dv,
            other => {
                return Err(CodegenError::InvalidConfig(format!(
                    "unknown key `{other}`; known keys: {}",
                    CONFIG_KEYS.join(", ")
                )))
            }
        };
        *slot = value;
        Ok(())
    }

    /// Applies `key=value` overrides; each string may hold several, separated
    /// by commas or whitespace (`"block_m=128,warps=8"`), as `mixc gen --config` passes them.
    pub fn with_overrides<S: AsRef<str>>(mut self, items: &[S]) -> Result<Self, CodegenError> {
        for item in items {
            for kv in item
                .as_ref()
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
            {
                let (key, value) = kv.split_once('=').ok_or_else(|| {
                    CodegenError::InvalidConfig(format!(
                        "`{kv}` is not `key=value` (e.g. `block_m=64`)"
                    ))
                })?;
                let (key, value) = (key.trim(), value.trim());
                let n: u32 = match value.parse::<u64>() {
                    Ok(n) => u32::try_from(n).map_err(|_| {
                        CodegenError::InvalidConfig(format!(
                            "`{key}={value}`: too large (tile sizes are at most {})",
                            u32::MAX
                        ))
                    })?,
                    Err(_) => {
                        return Err(CodegenError::InvalidConfig(format!(
                            "`{key}={value}`: expected a non-negative integer"
                        )))
                    }
                };
                self.set(key, n)?;
            }
        }
        Ok(self)
    }

    /// Checks that hold for every family; each family checks its own
    /// constraints (tile shapes its template supports, shared memory) on top.
    pub fn validate_common(&self) -> Result<(), CodegenError> {
        let pow2 = |name: &str, v: u32, lo: u32, hi: u32| {
            if v < lo || v > hi || !v.is_power_of_two() {
                Err(CodegenError::InvalidConfig(format!(
                    "{name}={v}: expected a power of two in {lo}..={hi}"
                )))
            } else {
                Ok(())
            }
        };
        pow2("block_m", self.block_m, 16, 256)?;
        pow2("block_n", self.block_n, 16, 256)?;
        pow2("warps", self.warps, 1, 16)?;
        pow2("chunk", self.chunk, 16, 256)?;
        if !(1..=4).contains(&self.stages) {
            return Err(CodegenError::InvalidConfig(format!(
                "stages={}: expected 1..=4",
                self.stages
            )));
        }
        if self.block_dv != 0 && !self.block_dv.is_multiple_of(16) {
            return Err(CodegenError::InvalidConfig(format!(
                "block_dv={}: expected 0 (all of d_v) or a multiple of 16",
                self.block_dv
            )));
        }
        Ok(())
    }

    /// `block_m=64 block_n=64 ...`, for header comments and logs.
    pub fn describe(&self) -> String {
        format!(
            "block_m={} block_n={} warps={} stages={} chunk={} block_dv={}",
            self.block_m, self.block_n, self.warps, self.stages, self.chunk, self.block_dv
        )
    }
}

impl fmt::Display for KernelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Rounds `x` up to a multiple of `m`.
pub fn round_up(x: u32, m: u32) -> u32 {
    x.div_ceil(m) * m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KernelConfig {
        KernelConfig {
            block_m: 64,
            block_n: 64,
            warps: 4,
            stages: 2,
            chunk: 64,
            block_dv: 0,
        }
    }

    #[test]
    fn overrides_parse_and_apply() {
        let c = cfg()
            .with_overrides(&["block_m=128,warps=8", " stages=3 block_n=32 "])
            .unwrap();
        assert_eq!((c.block_m, c.warps, c.stages, c.block_n), (128, 8, 3, 32));
        c.validate_common().unwrap();
    }

    #[test]
    fn bad_overrides_are_clear_errors() {
        let e = cfg().with_overrides(&["blockm=1"]).unwrap_err().to_string();
        assert!(
            e.contains("unknown key `blockm`") && e.contains("block_m"),
            "{e}"
        );
        let e = cfg().with_overrides(&["block_m"]).unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
        let e = cfg().with_overrides(&["warps=-2"]).unwrap_err().to_string();
        assert!(e.contains("non-negative integer"), "{e}");
        let c = cfg().with_overrides(&["block_n=48"]).unwrap();
        let e = c.validate_common().unwrap_err().to_string();
        assert!(
            e.contains("block_n=48") && e.contains("power of two"),
            "{e}"
        );
        let c = cfg().with_overrides(&["stages=0"]).unwrap();
        assert!(c.validate_common().is_err());
    }

    #[test]
    fn arch_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()).unwrap(), a);
        }
        assert!(Arch::parse("sm_75").is_err());
        assert!(Arch::Sm90.max_dynamic_smem_bytes() > Arch::Sm80.max_dynamic_smem_bytes());
    }
}
