"""SentencePiece `.model` files to fast tokenizers, without sentencepiece.

Some published dirs (XLM-R's first releases, multilingual MiniLM: a BERT
body with XLM-R's tokenizer) hold `sentencepiece.bpe.model` and no
tokenizer.json. That file is a protobuf `ModelProto`; this module reads the
few fields a Unigram tokenizer needs straight from the protobuf wire format
and builds the tokenizer transformers' XLM-R converter
(`convert_slow_tokenizer.XLMRobertaConverter`) would, so ids are exact.

The fields read (sentencepiece_model.proto):

- ModelProto: 1 pieces (repeated SentencePiece), 2 trainer_spec,
  3 normalizer_spec.
- SentencePiece: 1 piece (string), 2 score (float), 3 type (1 normal,
  2 unknown, 3 control, 4 user defined, 5 unused, 6 byte).
- TrainerSpec: 3 model_type (1 Unigram, 2 BPE, ...), 35 byte_fallback.
- NormalizerSpec: 2 precompiled_charsmap (bytes).

XLM-R's layout (fairseq's dictionary): ids 0-3 are <s>, <pad>, </s>, <unk>;
the file's piece i >= 3 gets id i + 1; <mask> is the last id.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from tokenizers import (
  AddedToken,
  Regex,
  Tokenizer,
  decoders,
  models,
  normalizers,
  pre_tokenizers,
  processors,
)

from bistil_jax import paths
from bistil_jax.errors import BistilError

XLMR_MODEL_FILE = "sentencepiece.bpe.model"
# Tokenizer classes whose `sentencepiece.bpe.model` has XLM-R's id layout.
XLMR_CLASSES = ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast")
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
UNIGRAM, CONTROL, USER_DEFINED = 1, 3, 4
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


@dataclasses.dataclass(frozen=True)
class Piece:
  piece: str
  score: float
  type: int = 1  # normal


@dataclasses.dataclass(frozen=True)
class SpmModel:
  """The parts of a SentencePiece ModelProto a Unigram tokenizer needs."""

  pieces: tuple[Piece, ...]
  model_type: int = UNIGRAM
  byte_fallback: bool = False
  precompiled_charsmap: bytes = b""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  """(value, next position) of the base-128 varint at `pos`."""
  value = shift = 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError("truncated or overlong varint")
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
  """(field number, value) of each field of one protobuf message.

  Varints are ints, fixed32/fixed64 their raw 4/8 bytes, length-delimited
  fields (strings, bytes, sub-messages) their bytes.

  Raises:
    ValueError: a truncated message or a wire type protobuf 3 never writes.
  """
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _varint(buf, pos)
    elif wire in (_FIXED64, _FIXED32, _BYTES):
      if wire == _BYTES:
        size, pos = _varint(buf, pos)
      else:
        size = 8 if wire == _FIXED64 else 4
      if pos + size > len(buf):
        raise ValueError(f"field {number} runs past the end of the message")
      value, pos = bytes(buf[pos : pos + size]), pos + size
    else:
      raise ValueError(f"unsupported wire type {wire} (field {number})")
    yield number, value


def _piece(buf: bytes) -> Piece:
  text, score, kind = "", 0.0, 1
  for number, value in fields(buf):
    if number == 1:
      text = value.decode("utf-8")
    elif number == 2:
      (score,) = struct.unpack("<f", value)
    elif number == 3:
      kind = value
  return Piece(text, float(score), int(kind))


def read_model(data: bytes) -> SpmModel:
  """Parses a serialised SentencePiece ModelProto.

  Raises:
    ValueError: bytes that are no such protobuf.
  """
  pieces, kw = [], {}
  for number, value in fields(data):
    if number == 1:
      pieces.append(_piece(value))
    elif number == 2:  # trainer_spec
      for n, v in fields(value):
        if n == 3:
          kw["model_type"] = int(v)
        elif n == 35:
          kw["byte_fallback"] = bool(v)
    elif number == 3:  # normalizer_spec
      for n, v in fields(value):
        if n == 2:
          kw["precompiled_charsmap"] = v
  if not pieces:
    raise ValueError("no vocabulary pieces")
  return SpmModel(tuple(pieces), **kw)


def read_model_file(path: paths.PathLike) -> SpmModel:
  """`read_model` of a file; BistilError when it is unreadable."""
  try:
    return read_model(paths.path(path).read_bytes())
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise BistilError(f"cannot read SentencePiece model {path}: {e}") from None


def xlmr_tokenizer(spm: SpmModel, source: str = "the model") -> Tokenizer:
  """The fast tokenizer of an XLM-R SentencePiece model.

  As transformers' XLMRobertaConverter wrapped in XLMRobertaTokenizerFast:
  a Unigram model over [<s>, <pad>, </s>, <unk>] + pieces[3:] + [<mask>]
  (unknown id 3), the precompiled normaliser then right strip and runs of
  spaces to one "▁", Metaspace pre-tokeniser and decoder, `<s> A </s>`
  (pair `<s> A </s> </s> B </s>`) post-processing, and the five specials as
  added tokens (<mask> strips the space before it).

  Raises:
    BistilError: a model that is not Unigram, uses byte fallback, or has
      fewer than the three leading XLM-R pieces.
  """
  if spm.model_type != UNIGRAM:
    raise BistilError(
      f"{source} is a SentencePiece model of type {spm.model_type}, not "
      "Unigram (1): only XLM-R's Unigram models are converted"
    )
  if spm.byte_fallback or len(spm.pieces) < 4:
    raise BistilError(f"{source} does not have XLM-R's SentencePiece layout")
  vocab = [(t, 0.0) for t in XLMR_SPECIALS]
  vocab += [(p.piece, p.score) for p in spm.pieces[3:]]
  vocab.append(("<mask>", 0.0))
  tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
  steps = [
    normalizers.Strip(left=False, right=True),
    normalizers.Replace(Regex(" {2,}"), "▁"),
  ]
  if spm.precompiled_charsmap:
    steps.insert(0, normalizers.Precompiled(spm.precompiled_charsmap))
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="always")
  tok.decoder = decoders.Metaspace("▁", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A </s>",
    pair="<s> $A </s> </s> $B </s>",
    special_tokens=[("<s>", 0), ("</s>", 2)],
  )
  # The file's control and user-defined pieces, as the converter adds them.
  tok.add_tokens(
    [
      AddedToken(p.piece, normalized=False, special=p.type == CONTROL)
      for p in spm.pieces
      if p.type in (CONTROL, USER_DEFINED)
    ]
  )
  tok.add_special_tokens(
    [AddedToken(t, normalized=False, special=True) for t in XLMR_SPECIALS]
    + [AddedToken("<mask>", lstrip=True, normalized=False, special=True)]
  )
  return tok
