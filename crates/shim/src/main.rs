//! `containerd-shim-forkvm-v1`: containerd's shim for the `io.containerd.forkvm.v1`
//! runtime (see the `forkvm_shim` crate docs).

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(forkvm_shim::shim::main(&args));
}
