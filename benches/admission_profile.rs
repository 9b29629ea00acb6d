//! Runs `kips::webhook::review::review` on one fixture many times, for an instruction profile:
//!
//!     valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*profiled_reviews*' \
//!         target/release/deps/admission_profile-* pod-typical 100
//!
//! Prints nothing timed; under `cargo bench` it runs once per fixture as a smoke test.

mod common;

use std::hint::black_box;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let config = kips::inject::InjectConfig::default();
    let (names, runs): (Vec<String>, usize) = match args.as_slice() {
        [name, runs, ..] => (vec![name.clone()], runs.parse().expect("runs is a number")),
        [name] => (vec![name.clone()], 1),
        [] => (
            common::all_fixtures()
                .into_iter()
                .map(|f| f.name)
                .chain(["pod-reinvoked".to_owned()])
                .collect(),
            1,
        ),
    };
    for name in names {
        let fixture = if name == "pod-reinvoked" {
            common::reinvoked_pod(&config)
        } else {
            let (kind, size) = name
                .split_once('-')
                .expect("a fixture name like pod-typical");
            let fixture = common::fixture(kind, size);
            common::assert_patched(&fixture, &config);
            fixture
        };
        profiled_reviews(&fixture.body, &config, runs);
        println!("admission_profile: {runs} reviews of {name}");
    }
}

/// The profiled region: callgrind's `--toggle-collect` counts only what runs inside it.
#[inline(never)]
fn profiled_reviews(body: &[u8], config: &kips::inject::InjectConfig, runs: usize) {
    for _ in 0..runs {
        black_box(kips::webhook::review::review(black_box(body), config));
    }
}
