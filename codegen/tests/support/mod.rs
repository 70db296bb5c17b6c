//! The specs of `examples/*.mix`, through the parser: every example is a test case.
#![allow(dead_code)]

use mixc_dsl::ir::{Family, MixerSpec};
use std::path::{Path, PathBuf};

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every example spec, sorted by file name.
pub fn example_specs() -> Vec<MixerSpec> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ is readable")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "mix"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/*.mix found");
    files
        .iter()
        .map(|p| mixc_dsl::parse_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// The softmax-family examples.
pub fn softmax_examples() -> Vec<MixerSpec> {
    example_specs()
        .into_iter()
        .filter(|s| s.family == Family::Softmax)
        .collect()
}

pub fn example(name: &str) -> MixerSpec {
    example_specs()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no example named {name}"))
}
