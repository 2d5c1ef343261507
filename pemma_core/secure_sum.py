"""Arithmetic and key helpers of per-group secure aggregation (SecAgg-style pairwise masking), pure.

The roles that use them are :mod:`client.secure_aggregation` (a site) and
:mod:`server.secure_aggregation` (the server); both must derive exactly the same masks,
so everything they have to agree on lives here: labels, the mask PRG, the pairwise seed,
key serialisation, modular arithmetic and dequantisation of a sum.

Values are quantised to integers in ``[0, target_range]`` and masked in the ring of
integers mod 2**32 (numpy ``uint32`` wrap-around). A site's masked tensor is

    q_v + PRG(b_v, self label) + sum_{w in cohort, w != v} (+1 if v < w else -1) PRG(s_vw, pair label)

so the pairwise terms cancel in the sum over a complete cohort, and the server removes
the self masks (and the pairwise masks of dropped sites) after Shamir recovery.

The PRG is ChaCha20's keystream under a key derived by HKDF-SHA256 from the seed and
the label. Flower's ``pseudo_rand_gen`` is deliberately not used: it seeds numpy's
MT19937 with 32 bits of the seed, so anyone could enumerate the 2**32 possible masks and
strip one from a masked tensor.

No Flower import here (docs/ARCHITECTURE.md): this module is tested without a federation.
"""

from __future__ import annotations

import base64

import json
import math
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CURVE",
    "MASK_DTYPE",
    "MAX_TARGET_RANGE",
    "MODULUS_BITS",
    "MAX_WEIGHT",
    "SELF_SEED_BYTES",
    "WEIGHT_PREFIX",
    "SecureAggregationError",
    "add_mod",
    "b64decode",
    "b64encode",
    "apply_masks",
    "check_quantization",
    "check_threshold",
    "dequantize_sum",
    "generate_private_key",
    "mask_label",
    "mask_stream",
    "pair_sign",
    "pairwise_seed",
    "private_from_bytes",
    "private_to_bytes",
    "public_from_bytes",
    "public_to_bytes",
    "sub_mod",
    "threshold_for",
    "weight_name",
]

WEIGHT_PREFIX = "__weight__::"
SELF_SEED_BYTES = 32
# Masked values are integers mod 2**32 (numpy uint32 wrap-around): a masked upload is as large as
# float32. The server picks each round's target range so that the sum over its k sites stays
# below 2**32 with 4 spare bits (server.secure_rounds.target_range): then a sum whose masks did not
# cancel lands above k * target_range for all but about 1 in 16 elements, and is caught.
MODULUS_BITS = 32
MASK_DTYPE = np.dtype(np.uint32)
MAX_TARGET_RANGE = 2**30
# Example counts are masked as uint32 too: capped so that the sum over many sites cannot wrap.
MAX_WEIGHT = 2**24
CURVE = ec.SECP384R1
_PRG_INFO = b"pemma-secagg-v1/mask-prg/"
_PAIR_INFO = b"pemma-secagg-v1/pairwise-seed"


class SecureAggregationError(ValueError):
    """A secure-aggregation step was refused; ``site`` and ``field`` name what was wrong, when known."""

    def __init__(self, message: str, *, site: str | None = None, field: str | None = None):
        super().__init__(message)
        self.site = site
        self.field = field


def weight_name(group: str) -> str:
    """The reserved name under which ``group``'s example count travels masked."""
    return WEIGHT_PREFIX + group


def check_threshold(n: int, threshold: int) -> None:
    """Refuse a Shamir threshold that lets fewer than a majority (or a single site) recover a secret.

    ``threshold > n / 2`` means two disjoint sets of responders can never both reach it,
    which is what stops a server from getting both shares of one site from two halves.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SecureAggregationError(f"members: need at least 2 members, got {n!r}", field="members")
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise SecureAggregationError(f"threshold: must be an int, got {threshold!r}", field="threshold")
    if threshold < 2 or threshold > n or 2 * threshold <= n:
        raise SecureAggregationError(
            f"threshold: {threshold} is invalid for {n} members (need 2 <= t <= n and t > n/2)",
            field="threshold",
        )


def threshold_for(n: int, max_dropouts: int) -> int:
    """``t = max(2, n - max_dropouts)``, validated by :func:`check_threshold`."""
    if isinstance(max_dropouts, bool) or not isinstance(max_dropouts, int) or max_dropouts < 0:
        raise SecureAggregationError(
            f"max_dropouts: must be an int >= 0, got {max_dropouts!r}", field="max_dropouts"
        )
    threshold = max(2, n - max_dropouts)
    check_threshold(n, threshold)
    return threshold


def check_quantization(clip_range: float, target_range: int) -> None:
    if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
        raise SecureAggregationError(f"clip_range: must be a float, got {clip_range!r}", field="clip_range")
    if not math.isfinite(clip_range) or clip_range <= 0:
        raise SecureAggregationError(f"clip_range: must be finite and > 0, got {clip_range!r}", field="clip_range")
    if isinstance(target_range, bool) or not isinstance(target_range, int):
        raise SecureAggregationError(f"target_range: must be an int, got {target_range!r}", field="target_range")
    if not 1 <= target_range <= MAX_TARGET_RANGE:
        raise SecureAggregationError(
            f"target_range: must be in [1, 2**30], got {target_range}", field="target_range"
        )


def mask_label(kind: str, round_: int, group: str, tensor: str) -> str:
    """Domain-separated label of one mask; JSON so that no name can collide with another split."""
    if kind not in ("self", "pair"):
        raise ValueError(f"kind: must be 'self' or 'pair', got {kind!r}")
    return json.dumps(["pemma-secagg-v1", kind, int(round_), group, tensor])


def b64encode(data: bytes) -> str:
    """Bytes as base64 text (keys, ciphertexts and shares travel inside JSON message entries)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """The bytes of base64 ``text``; raises ``ValueError`` (binascii.Error) for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text.encode("ascii"), validate=True)


def mask_stream(seed: bytes, label: str, size: int) -> np.ndarray:
    """``size`` uniform uint32 values: ChaCha20 keystream under HKDF-SHA256(seed, info=label).

    The key is unique per (seed, label), so the fixed zero nonce never repeats under a key.
    """
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise SecureAggregationError("seed: must be at least 16 bytes", field="seed")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SecureAggregationError(f"size: must be an int >= 0, got {size!r}", field="size")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PRG_INFO + label.encode()).derive(seed)
    encryptor = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * size))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _check_u64(a: np.ndarray, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint32:
        raise SecureAggregationError(f"{name}: must be a uint32 array", field=name)


def add_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b) mod 2**32`` elementwise (a new array)."""
    _check_u64(a, "a")
    _check_u64(b, "b")
    return np.add(a, b, dtype=np.uint32)


def sub_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) mod 2**32`` elementwise (a new array)."""
    _check_u64(a, "a")
    _check_u64(b, "b")
    return np.subtract(a, b, dtype=np.uint32)


def pair_sign(me: str, other: str) -> int:
    """+1 if ``me`` sorts before ``other`` (it adds the pairwise mask), else -1 (it subtracts)."""
    if me == other:
        raise ValueError("pair_sign: a site has no pairwise mask with itself")
    return 1 if me < other else -1


def apply_masks(
    values: np.ndarray,
    *,
    me: str,
    round_: int,
    group: str,
    tensor: str,
    self_seed: bytes | None,
    pair_seeds: Mapping[str, bytes],
    sign: int = 1,
) -> np.ndarray:
    """``values`` + sign * (self mask + signed pairwise masks of ``me`` with each peer), mod 2**32.

    The site calls it with ``sign=1``; the server calls it with ``sign=-1`` and only the
    masks it must remove (the self mask of a survivor, the pairwise masks towards dropped peers).
    """
    _check_u64(values, "values")
    out = values.reshape(-1).copy()
    size = out.size
    total = np.zeros(size, dtype=np.uint32)
    if self_seed is not None:
        total = add_mod(total, mask_stream(self_seed, mask_label("self", round_, group, tensor), size))
    pair_label = mask_label("pair", round_, group, tensor)
    for peer in sorted(pair_seeds):
        stream = mask_stream(pair_seeds[peer], pair_label, size)
        total = add_mod(total, stream) if pair_sign(me, peer) > 0 else sub_mod(total, stream)
    out = add_mod(out, total) if sign > 0 else sub_mod(out, total)
    return out.reshape(values.shape)


def dequantize_sum(sum_uint32: np.ndarray, k: int, clip_range: float, target_range: int) -> np.ndarray:
    """Sum of ``k`` dequantised values from the sum of their quantisations: ``S * 2c/T - k*c``.

    Refuses a sum outside ``[0, k * target_range]``: that is what an incomplete or wrong
    unmasking leaves (a uniform uint32 lands inside with probability about k * 2**-34).
    """
    _check_u64(sum_uint32, "sum_uint32")
    check_quantization(clip_range, target_range)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SecureAggregationError(f"k: must be an int >= 1, got {k!r}", field="k")
    if sum_uint32.size and int(sum_uint32.max()) > k * target_range:
        raise SecureAggregationError(
            f"sum_uint32: value above {k} * target_range: the masks did not cancel", field="sum_uint32"
        )
    return sum_uint32.astype(np.float64) * (2.0 * clip_range / target_range) - k * float(clip_range)


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def private_to_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 DER, unencrypted: what a site keeps in its own state and splits with Shamir."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def private_from_bytes(data: bytes, *, field: str = "private key", site: str | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SecureAggregationError(f"{field}: not a DER private key ({exc})", site=site, field=field) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise SecureAggregationError(f"{field}: not a {CURVE.name} key", site=site, field=field)
    return key


def public_to_bytes(key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo DER."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_from_bytes(data: bytes, *, field: str = "public key", site: str | None = None) -> ec.EllipticCurvePublicKey:
    if not isinstance(data, bytes):
        raise SecureAggregationError(f"{field}: must be bytes, got {type(data).__name__}", site=site, field=field)
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SecureAggregationError(f"{field}: not a DER public key ({exc})", site=site, field=field) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != CURVE.name:
        raise SecureAggregationError(f"{field}: not a {CURVE.name} key", site=site, field=field)
    return key


def pairwise_seed(private: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    """32-byte seed shared by a pair: HKDF-SHA256 over the ECDH secret (symmetric in the pair)."""
    secret = private.exchange(ec.ECDH(), public)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PAIR_INFO).derive(secret)
