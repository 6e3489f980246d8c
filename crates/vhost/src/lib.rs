//! Virtual KVM test host: runs a command where a real KVM exists, directly or inside a TCG-emulated QEMU with nested SVM.
