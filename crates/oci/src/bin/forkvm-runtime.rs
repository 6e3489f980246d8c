//! `forkvm-runtime`: an OCI runtime with runc's command line; see
//! [`forkvm_oci::runtime`].

fn main() {
    std::process::exit(forkvm_oci::runtime::main());
}
