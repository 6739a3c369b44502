//! Builds guest-init as a static binary and leaves it in OUT_DIR, where `initramfs.rs` embeds it: one
//! `vmm` binary carries its guest's PID 1, so nothing has to be installed beside it.
//!
//! Set VMM_GUEST_INIT=/path/to/guest-init to embed a prebuilt binary instead.
// A build script that cannot go on should stop the build with the reason: expect says it.
#![allow(clippy::expect_used)]

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guest-init");
    println!("cargo:rerun-if-env-changed=VMM_GUEST_INIT");
    if let Some(prebuilt) = env::var_os("VMM_GUEST_INIT") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        std::fs::copy(&prebuilt, &out).expect("copy VMM_GUEST_INIT into OUT_DIR");
        return;
    }

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.parent().expect("vmm/ sits in the workspace root");
    for input in [
        "guest-init/src",
        "guest-init/Cargo.toml",
        "protocol/src",
        "protocol/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    // A target directory of its own: the outer cargo holds the lock on the workspace's.
    let target_dir = root.join("target").join("guest-init");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "-p",
            "guest-init",
            "--profile",
            "guest",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // --target keeps crt-static away from proc-macro crates, which must stay dynamic
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("run cargo to build guest-init");
    assert!(status.success(), "building guest-init failed");
    let built = target_dir.join(TARGET).join("guest").join("guest-init");
    std::fs::copy(&built, &out).expect("copy guest-init into OUT_DIR");
}
