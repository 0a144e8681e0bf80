//! Generates the Rust code of `moebius.v1` with the vendored `protoc`, so a fresh machine
//! needs no system package to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("moebius_descriptor.bin"))
        .compile_protos(
            &[
                "moebius/v1/inference.proto",
                "moebius/v1/worker.proto",
                "moebius/v1/admin.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=moebius");
    Ok(())
}
