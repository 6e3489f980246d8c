//! Image store: imports OCI images and turns their layers into read-only root filesystems cached by digest.
