//! prost encoding with buffers sized for this API's messages.
//!
//! tonic gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer up front. An utterance is about a hundred bytes and a directive a
//! few hundred, and a voice runtime holds thousands of calls open that are
//! mostly silent: those buffers were most of an idle call's memory. They
//! start small here and grow as a message needs (a 64 KiB text still
//! decodes), so only large messages pay for large buffers.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial buffer per stream and direction: a few of the API's messages.
const BUFFER: usize = 1024;
/// An encoder yields what it has once this much is queued (tonic's own
/// default): a burst of directives still goes out in few frames.
const YIELD: usize = 32 * 1024;

/// The codec the generated `crisis.v1` client and server use.
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD))
    }
}
