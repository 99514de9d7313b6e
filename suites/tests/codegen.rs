//! Checks that the checked-in gRPC code in `proto/echo.rs` is up to date with
//! `proto/echo.proto`.
//!
//! The code is generated with `tonic-prost-build` and the `protoc` binary
//! shipped by `protoc-bin-vendored`, so no build script and no system `protoc`
//! are needed. After editing `proto/echo.proto`, regenerate with:
//!
//! ```text
//! UPDATE_GENERATED=1 cargo test -p stream-guard-suites --test codegen
//! ```
//!
//! Without `UPDATE_GENERATED=1` the test regenerates into a temporary
//! directory and fails if the result differs from `proto/echo.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A temporary directory that is removed when dropped (also on panic).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "tower-stream-guard-codegen-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create temporary output directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `protoc` + `tonic-prost-build` on `proto/echo.proto`, writing
/// `echo.rs` into `out_dir`, and returns the generated file's path.
fn generate(out_dir: &Path) -> PathBuf {
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc binary");

    // Point prost at the vendored protoc directly instead of via `PROTOC`,
    // which would need `std::env::set_var`.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out_dir)
        .compile_with_config(config, &[proto_dir.join("echo.proto")], &[proto_dir])
        .expect("generate code from proto/echo.proto");

    out_dir.join("echo.rs")
}

/// Index of the first line where `a` and `b` differ (1-based), with both lines.
fn first_difference(a: &str, b: &str) -> String {
    let mut a_lines = a.lines();
    let mut b_lines = b.lines();
    let mut line = 1;
    loop {
        match (a_lines.next(), b_lines.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (None, None) => {
                return "files differ only in line endings or a trailing newline".to_owned();
            }
            (x, y) => {
                return format!(
                    "first difference at line {line}:\n  checked in: {x:?}\n  generated:  {y:?}"
                );
            }
        }
    }
}

#[test]
fn generated_code_matches_proto() {
    let tmp = TempDir::new();
    let generated_path = generate(&tmp.0);
    let generated = fs::read(&generated_path).expect("read freshly generated code");

    let checked_in_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/echo.rs");

    if std::env::var_os("UPDATE_GENERATED").is_some_and(|v| v == "1") {
        fs::write(&checked_in_path, &generated).expect("write proto/echo.rs");
        eprintln!("updated {}", checked_in_path.display());
        return;
    }

    let checked_in = fs::read(&checked_in_path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nGenerate it with: UPDATE_GENERATED=1 cargo test -p stream-guard-suites --test codegen",
            checked_in_path.display()
        )
    });
    assert!(
        checked_in == generated,
        "{} is out of date with proto/echo.proto ({}).\n\
         Regenerate it with: UPDATE_GENERATED=1 cargo test -p stream-guard-suites --test codegen",
        checked_in_path.display(),
        first_difference(
            &String::from_utf8_lossy(&checked_in),
            &String::from_utf8_lossy(&generated)
        ),
    );
}
