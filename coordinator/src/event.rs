//! What the coordinator daemon's connection and upload tasks tell the task that owns the
//! machine.

use fedtune_protocol::{PublicKey, SignedHeader, ToClient, ToCoordinator, Upload};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

/// An event for the machine's task.
pub(crate) enum Event {
    Hello {
        pk: PublicKey,
        id: u64,
        conn: quinn::Connection,
        tx: mpsc::Sender<ToClient>,
    },
    Msg {
        pk: PublicKey,
        msg: ToCoordinator,
    },
    /// An upload's header, for [`Coordinator::handle_upload_header`](crate::Coordinator::handle_upload_header).
    UploadHeader {
        pk: PublicKey,
        header: Box<SignedHeader>,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    /// A whole upload, for [`Coordinator::handle_upload`](crate::Coordinator::handle_upload).
    Upload {
        pk: PublicKey,
        upload: Upload,
        /// The payload's share of the upload memory budget, given back once handled.
        _permit: OwnedSemaphorePermit,
    },
    Gone {
        pk: PublicKey,
        id: u64,
    },
    /// A partial upload removed before it completed.
    Abandoned {
        pk: PublicKey,
        round: u64,
        bytes: u64,
        why: String,
    },
    /// An upload of `bytes` could not be written (a full disk): its client is asked again
    /// once there is room.
    NoRoom {
        pk: PublicKey,
        bytes: u64,
    },
}

/// Why an upload's header was not taken.
pub(crate) enum Refusal {
    /// The machine rejected it (answered and counted there).
    Rejected,
    /// The coordinator has no room for it now (logged); the client is asked again later.
    NoRoom,
}
