//! `kips inject` on any YAML stream: it never panics; whatever it prints, it prints again
//! unchanged when given its own output (an injected manifest is a fixed point, as the
//! webhook's reinvocation is); and what it prints is YAML again.
#![no_main]

use kips::fuzzing::inject_manifests;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The same configurations as the structured review target, chosen by the length.
    let config = kips::fuzzing::inject_config(data.len() % 2 == 0, 15100, data.len() % 3);
    let Ok((printed, _warnings)) = inject_manifests(text, &config) else {
        return;
    };
    let (again, _) = inject_manifests(&printed, &config).unwrap_or_else(|error| {
        panic!("kips inject refuses its own output: {error:#}\n--- input\n{text}\n--- output\n{printed}")
    });
    assert_eq!(
        again, printed,
        "kips inject changes its own output\n--- input\n{text}"
    );
});
