//! Feeds arbitrary UTF-8 to the spec parser: it must never panic, and every
//! error must render.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(diags) = mixc_dsl::parse_str(src) {
        assert!(!diags.is_empty());
        let rendered = diags.render("fuzz.mix", src);
        assert!(rendered.contains("error: "));
    }
});
