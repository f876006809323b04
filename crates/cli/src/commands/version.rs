//! `dpo --version`: the version, the features this binary was built with, and the CPU kernels it finds
//! at run time (what a bug report needs to say which code ran).

/// The text after `dpo `: computed once (clap wants a `'static` string; the kernels are detected at run
/// time, so it cannot be a constant).
pub fn text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "{}\nfeatures: mpi {}\nf32 kernel: {}\nbf16 kernel: {}",
            env!("CARGO_PKG_VERSION"),
            on(cfg!(feature = "mpi")),
            engine::kernels::describe_f32_kernel(),
            engine::kernels::Bf16Kernel::detect().describe()
        )
    })
}
