//! `containerd-shim-forkvm-v1`: containerd's shim for the `io.containerd.forkvm.v1`
//! runtime (see the `forkvm_shim` crate docs).

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = forkvm_shim::shim::run_action(&args) {
        std::process::exit(code);
    }
    containerd_shim::run::<forkvm_shim::ForkvmShim>(forkvm_shim::RUNTIME_ID, None);
}
