//! Saving a device and making a new one from what was saved.
//!
//! Every device a VM can have implements [`Persist`]: `save` gives its state as plain
//! data, and `restore` builds a new device from that state plus what the state does
//! not hold (host resources such as eventfds and the console, and the configuration
//! the VMM decided on, which for a fork child carries its new identity). The VMM
//! attaches devices only through this trait, so a device that cannot save does not
//! compile into a VM.
//!
//! A saved state comes from a file that may have been tampered with: `restore` checks
//! it against the device it builds and refuses anything that does not fit.

/// A device (or other piece of VM state) that can be saved and restored.
pub trait Persist<'a>: Sized {
    /// What survives: plain serializable data.
    type State;
    /// What a restore needs besides the state.
    type ConstructorArgs;
    /// Why a save or a restore failed.
    type Error;

    /// The object's state. Take it with the vCPUs and the device event loop paused.
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A new object built from `args` with the state `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
