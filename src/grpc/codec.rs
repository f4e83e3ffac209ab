//! The protobuf codec of piivault's services: prost's, except that a
//! message that does not decode (truncated varint, wrong wire type, a length
//! past the end) is the caller's error, `INVALID_ARGUMENT` with a fixed
//! message, counted in `piivault_malformed_messages_total`. tonic's own
//! codec answers INTERNAL, which tells clients and dashboards that the
//! server broke.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// What a caller is told about a message that does not decode.
pub const MALFORMED: &str = "the message is not a well-formed protobuf message of this method's type";

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _type: PhantomData }
    }
}

/// Decodes `U`, answering `INVALID_ARGUMENT` when the bytes are not one.
#[derive(Debug)]
pub struct StrictDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|_| {
            crate::metrics::metrics().malformed_messages.inc();
            Status::invalid_argument(MALFORMED)
        })
    }
}
