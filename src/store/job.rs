//! A write request for a backend's writer thread, generic over what the
//! backend's jobs work with (its transaction and audit chain): `apply`
//! runs inside the batch transaction, `finish` answers once the batch
//! committed (or failed).

use tokio::sync::oneshot;

use super::StoreError;

pub(crate) trait WriteJob<Tx>: Send {
    fn apply(&mut self, tx: &mut Tx) -> Result<(), StoreError>;
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
}

/// A closure over the transaction and the channel its answer goes back on.
pub(crate) struct Job<T, F> {
    work: Option<F>,
    output: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job<T, F> {
    pub(crate) fn new(work: F, reply: oneshot::Sender<Result<T, StoreError>>) -> Self {
        Self { work: Some(work), output: None, reply }
    }
}

impl<Tx, T, F> WriteJob<Tx> for Job<T, F>
where
    T: Send,
    F: FnOnce(&mut Tx) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tx: &mut Tx) -> Result<(), StoreError> {
        let work = self.work.take().ok_or(StoreError::Closed)?;
        self.output = Some(work(tx)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let Self { output, reply, .. } = *self;
        let result = outcome.and_then(|()| output.ok_or(StoreError::Closed));
        // The requester may have gone away (deadline, cancellation): its
        // data is committed all the same, and nobody is left to tell.
        let _ = reply.send(result);
    }
}

/// A job's answer once its batch ended: its own outcome if the batch
/// committed; if the batch failed, the job's own error where it had one
/// (not the `Closed` of a job never run), else the batch's.
pub(crate) fn outcome(committed: &Result<(), StoreError>, own: Result<(), StoreError>) -> Result<(), StoreError> {
    match (committed, own) {
        (Ok(()), own) => own,
        (Err(_), Err(own)) if !matches!(own, StoreError::Closed) => Err(own),
        (Err(error), _) => Err(error.clone()),
    }
}
