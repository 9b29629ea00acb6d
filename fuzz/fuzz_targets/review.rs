//! Any bytes as an AdmissionReview body: the webhook's decode → decision → patch path with
//! the properties of `kips_fuzz::check_review`. Seeded with the test fixtures; mutated by
//! libFuzzer with the JSON dictionary of `fuzz/dict/admission.dict`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    kips_fuzz::check_review(body, &kips::inject::InjectConfig::default());
});
