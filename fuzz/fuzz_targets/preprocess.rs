//! The image path: any bytes through the header read, the decode-cost estimate, the decode and
//! every view set, as the engine runs them. Must never panic, hang or allocate past the limits.
#![no_main]

use feature_server::preprocess::{
    self, INPUT_SIZE, Limits, SCALES_AND_MIRRORS, View, decode_with, read_header, views_of,
};
use libfuzzer_sys::fuzz_target;

/// Small limits keep each run quick; the code paths are the same as the server's.
const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_pixels: 4_000_000,
};

fuzz_target!(|data: &[u8]| {
    let Ok(header) = read_header(data, &LIMITS) else {
        return;
    };
    assert!(header.pixels() <= LIMITS.max_pixels);
    assert!(header.decode_bytes() >= header.pixels());
    let Ok(img) = decode_with(data, &LIMITS, &header) else {
        return;
    };
    for views in [&[View::CENTER][..], &SCALES_AND_MIRRORS[..]] {
        let tensors = views_of(&img, views).expect("a decoded image has every view");
        assert_eq!(tensors.len(), views.len());
        for t in &tensors {
            assert_eq!(t.len(), 3 * INPUT_SIZE * INPUT_SIZE);
            assert!(t.iter().all(|v| v.is_finite()));
        }
    }
    // The one-call path agrees with the staged one.
    let direct = preprocess::preprocess_views(data, &LIMITS, &[View::CENTER]);
    assert!(direct.is_ok());
});
