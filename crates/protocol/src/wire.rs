//! Serde helpers that keep decoding allocation-bounded.
//!
//! A length prefix is attacker-controlled. bincode's owned-string path
//! allocates the announced length *before* it checks that the bytes are
//! there, so a 6-byte frame claiming a 2^60-byte string would abort the
//! process. Every `String` and byte-buffer field therefore deserializes
//! through these helpers, which ask for a *borrowed* `&str`/`&[u8]`: the
//! decoder can only hand one out if the bytes really are in the input,
//! and the copy made here is exactly as long as the data. The tests in
//! `tests/hostile.rs` measure the peak allocation to keep this honest.

use std::fmt;

use bytes::Bytes;
use serde::Deserializer;
use serde::de::{self, SeqAccess, Visitor};

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a UTF-8 string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }
}

/// A `String` field, copied from a borrowed slice of the input.
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_str(TextVisitor)
}

/// Wrapper so a sequence element can use [`text`].
struct Text(String);

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(d).map(Text)
    }
}

struct TextsVisitor;

impl<'de> Visitor<'de> for TextsVisitor {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence of strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        // Never trust the announced length for preallocation beyond what
        // the smallest possible element (1 length byte) could fill.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(Text(s)) = seq.next_element()? {
            out.push(s);
        }
        Ok(out)
    }
}

/// A `Vec<String>` field whose strings go through [`text`].
pub(crate) fn texts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_seq(TextsVisitor)
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(v))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(v))
    }

    // Human-readable formats (the JSON test vectors) write bytes as an
    // array of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(256));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Bytes::from(out))
    }
}

struct Blob(Bytes);

impl<'de> serde::Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BlobVisitor).map(Blob)
    }
}

struct BlobsVisitor;

impl<'de> Visitor<'de> for BlobsVisitor {
    type Value = Vec<Bytes>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence of byte strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Bytes>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(Blob(b)) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// A `Vec<Bytes>` field (the batch container's inner frames).
pub(crate) fn blobs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Bytes>, D::Error> {
    d.deserialize_seq(BlobsVisitor)
}

struct ListVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: serde::Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // The announced count is a hint from the peer: reserve a little,
        // let real elements grow the vector.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(item) = seq.next_element()? {
            out.push(item);
        }
        Ok(out)
    }
}

/// A `Vec<T>` field whose preallocation ignores the announced length.
pub(crate) fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    d.deserialize_seq(ListVisitor(std::marker::PhantomData))
}
