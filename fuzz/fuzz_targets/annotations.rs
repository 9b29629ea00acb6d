//! The annotation grammar: parse → render → parse gives the same annotations and the same
//! rendering (normalisation is a fixed point), each key's `normalise` agrees with the
//! rendering, and every rejection names the annotation and the value as written.
#![no_main]

use std::collections::BTreeMap;

use kips::fuzzing::{USER_KEYS, normalise_annotation, parse_annotations};
use libfuzzer_sys::fuzz_target;

/// Reads the input as annotations, one `<key>\t<value>` per line (a line without a tab is a
/// `kips.io/redirect` value), so that seeds are readable and libFuzzer's dictionary applies.
fn annotations(text: &str) -> BTreeMap<String, String> {
    text.split('\n')
        .filter(|line| !line.is_empty())
        .map(|line| match line.split_once('\t') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (USER_KEYS[0].to_owned(), line.to_owned()),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Annotations are a map: one value per key, the last written wins.
    let annotations = annotations(text);
    let pairs = || annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    match parse_annotations(pairs()) {
        Ok(parsed) => {
            let rendered = parsed.render();
            let again = parse_annotations(rendered.iter().map(|(k, v)| (*k, v.as_str())))
                .unwrap_or_else(|errors| {
                    panic!("the rendering {rendered:?} of {annotations:?} is refused: {errors:?}")
                });
            assert_eq!(again, parsed, "parse → render → parse of {annotations:?}");
            assert_eq!(
                again.render(),
                rendered,
                "normalising twice changes {annotations:?}"
            );
            for (key, written) in pairs().filter(|(k, _)| USER_KEYS.contains(k)) {
                let normalised = normalise_annotation(key, written).unwrap_or_else(|e| {
                    panic!("{key}={written:?} parsed, but normalise refuses: {e}")
                });
                assert_eq!(Some(&normalised), rendered.get(key), "{key}={written:?}");
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            for error in errors {
                let written = annotations.get(&error.key).unwrap_or_else(|| {
                    panic!(
                        "the error names {:?}, which was not written: {error}",
                        error.key
                    )
                });
                assert_eq!(
                    &error.value, written,
                    "the error names a value other than the one written: {error}"
                );
                let message = error.to_string();
                assert!(
                    message.starts_with(&format!("{}: \"{}\": ", error.key, written)),
                    "{message}"
                );
                assert!(!error.problem.is_empty(), "{message}");
            }
        }
    }
});
