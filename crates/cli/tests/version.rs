//! `dpo --version`: the version, the build's features and the CPU kernels found at run time.

mod common;

fn version(portable: bool) -> String {
    let mut c = common::dpo();
    c.arg("--version");
    if portable {
        c.env("DPO_GEMM", "portable");
    } else {
        c.env_remove("DPO_GEMM");
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn version_names_features_and_kernels() {
    let v = version(false);
    let lines: Vec<&str> = v.lines().collect();
    assert_eq!(lines[0], format!("dpo {}", env!("CARGO_PKG_VERSION")));
    let mpi = if cfg!(feature = "mpi") { "on" } else { "off" };
    assert_eq!(lines[1], format!("features: mpi {mpi}"));
    assert!(lines[2].starts_with("f32 kernel: ") && lines[3].starts_with("bf16 kernel: "), "{v}");
    // What the CPU has decides the kernels; DPO_GEMM=portable forces the portable ones.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(lines[2].contains("avx512f"), std::arch::is_x86_feature_detected!("avx512f"), "{v}");
    let p = version(true);
    assert!(p.contains("f32 kernel: gemm crate") && p.contains("bf16 kernel: emulated"), "{p}");
}
