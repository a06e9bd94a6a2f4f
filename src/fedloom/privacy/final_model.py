"""Each site keeps the result: the final global model it evaluated, signed.

At the federation's final evaluation a site keeps the model it was sent in
``STATE/final/<run>.safetensors``: the model's tensors, in its own names and dtypes
(as the task saw them), and in the file's header the plan hash this site approved, the
task and round the aggregator published the model for, the aggregator's signature and
its certificate. Anyone holding the federation's CA certificate can check the file
later (:func:`check_final_model`, ``fedloom audit model``): the certificate is the
aggregator's, issued by that CA, and its signature covers these very tensors. The
plan hash is the site's own record (the aggregator let the site in only under it); the
signature does not cover it.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedloom.compression.codecs import ModelCodec, encode_model
from fedloom.core.errors import AuditError, StateError
from fedloom.core.weights import Weights
from fedloom.pki.common import load_cert
from fedloom.privacy.published import model_statement
from fedloom.privacy.signing import verify
from fedloom.store.checkpoint import load_weights, read_metadata, save_weights
from fedloom.transport.messages import ModelHeader

FINAL_DIR = "final"  # STATE/final: the final models this site kept, one per run
_PREFIX = "fedloom.final."
_KEYS = ("plan_hash", "attempt_id", "round", "signature", "aggregator_cert", "site", "model_codec")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, kw_only=True)
class FinalModel:
    """What a kept final model's header says about it."""

    plan_hash: str
    attempt_id: str  # the final evaluation's task: ``<run id>/<round>.<attempt>``
    round: int
    signature: bytes  # the aggregator's, over the model as it travelled
    aggregator_cert: bytes  # PEM
    site: str  # the site that kept it
    model_codec: ModelCodec  # how the model travelled (compression.model)
    saved: str = ""  # when, UTC, ISO 8601

    def metadata(self) -> dict[str, str]:
        values = {
            "plan_hash": self.plan_hash,
            "attempt_id": self.attempt_id,
            "round": str(self.round),
            "signature": self.signature.hex(),
            "aggregator_cert": self.aggregator_cert.decode("ascii"),
            "site": self.site,
            "model_codec": self.model_codec.value,
            "saved": self.saved,
        }
        return {_PREFIX + key: value for key, value in values.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> FinalModel:
        if _PREFIX + "task_id" in meta and _PREFIX + "attempt_id" not in meta:
            meta = {**meta, _PREFIX + "attempt_id": meta[_PREFIX + "task_id"]}  # before protocol 6
        missing = [key for key in _KEYS if _PREFIX + key not in meta]
        if missing:
            raise AuditError(
                f"{where} is not a final model a fedloom site kept (its header lacks "
                f"{', '.join(missing)})",
                hint="pass a file from a site's state folder: STATE/final/<run>.safetensors",
            )
        get = {key: meta[_PREFIX + key] for key in (*_KEYS, "saved") if _PREFIX + key in meta}
        try:
            return cls(
                plan_hash=get["plan_hash"],
                attempt_id=get["attempt_id"],
                round=int(get["round"]),
                signature=bytes.fromhex(get["signature"]),
                aggregator_cert=get["aggregator_cert"].encode("ascii"),
                site=get["site"],
                model_codec=ModelCodec(get["model_codec"]),
                saved=get.get("saved", ""),
            )
        except (ValueError, UnicodeEncodeError) as err:
            raise AuditError(
                f"{where}: its header was changed: {err}",
                hint="keep the site's copy as it was written; ask another site for its copy",
            ) from err


def final_model_path(state_dir: Path, attempt_id: str, plan_hash: str) -> Path:
    """``STATE/final/<run id>.safetensors``: one file per run, named by the run id the
    attempt id begins with (the plan hash's start if that is no plain file name)."""
    run = attempt_id.partition("/")[0]
    name = run if _SAFE_NAME.fullmatch(run) else f"plan-{plan_hash[:16]}"
    return state_dir / FINAL_DIR / f"{name}.safetensors"


def keep_final_model(
    state_dir: Path,
    header: ModelHeader,
    weights: Weights,
    *,
    plan_hash: str,
    site: str,
    aggregator_cert: bytes,
    model_codec: ModelCodec,
) -> Path:
    """Write the final global model ``weights`` (decoded from what arrived with
    ``header``, already checked against its signature) to the site's state folder,
    atomically; returns its path. A later attempt of the same evaluation replaces it
    (the same model, another attempt id)."""
    info = FinalModel(
        plan_hash=plan_hash,
        attempt_id=header.attempt_id,
        round=header.round,
        signature=header.signature,
        aggregator_cert=aggregator_cert,
        site=site,
        model_codec=model_codec,
        saved=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    path = final_model_path(state_dir, header.attempt_id, plan_hash)
    save_weights(path, weights, metadata=info.metadata())
    return path


def read_final_model(path: Path) -> tuple[FinalModel, Weights]:
    """A kept final model: what its header says, and its tensors."""
    try:
        meta = read_metadata(path)
        weights = load_weights(path)
    except StateError as err:
        raise AuditError(err.message, hint=err.hint) from err
    return FinalModel.from_metadata(meta, str(path)), weights


def check_final_model(path: Path, ca_pem: bytes) -> tuple[FinalModel, Weights]:
    """The kept final model at ``path`` (as :func:`read_final_model`), once checked: its
    certificate is an aggregator's
    the CA ``ca_pem`` issued (whatever the dates: a model stays verifiable after the
    certificate expires), and its signature covers its task, round and tensors.
    :class:`AuditError` says what does not hold."""
    info, weights = read_final_model(path)
    ca = load_cert(ca_pem, "CA certificate")
    cert = load_cert(info.aggregator_cert, "aggregator certificate in the model's header")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise AuditError(
            f"{path}: the certificate that signed it was not issued by the federation's CA",
            hint="check it with the CA certificate of the federation it came from (--ca)",
        ) from err
    if not _serves(cert):
        raise AuditError(
            f"{path}: it was signed with a certificate that is not the aggregator's "
            f"({cert.subject.rfc4514_string()})",
            hint="only the aggregator publishes global models; this file is not one",
        )
    travelled = encode_model(weights, info.model_codec)  # the bytes the signature covers
    statement = model_statement(info.attempt_id, info.round, travelled)
    if not verify(cert, statement, info.signature):
        raise AuditError(
            f"{path} is not the model the aggregator signed: its tensors, or its task or "
            "round, were changed",
            hint="keep the site's copy as it was written; ask another site for its copy",
        )
    return info, weights


def _serves(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in usage
