//! mixc codegen: lowers a validated `MixerSpec` to CUDA C++ via tera templates.
