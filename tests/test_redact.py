"""The redactor: every form of every canary is scrubbed wherever it is embedded."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import pickle
import re
import sys
import threading
from dataclasses import dataclass
from urllib.parse import quote, quote_plus

import pytest

from agent.core.redact import (
    MASK,
    MIN_LENGTH,
    RedactingFilter,
    Redactor,
    Secret,
    _go_json,
    _go_quote,
    install_logging_redaction,
    redact_exception,
    remove_logging_redaction,
    secret_forms,
)
from tests.support.canaries import Canary, every_form, find_leaks, load_canaries

CANARIES = load_canaries()


@pytest.fixture(scope="module")
def shared() -> Redactor:
    """One redactor with every canary registered, as in a pass with many secrets."""
    redactor = Redactor()
    for canary in CANARIES:
        redactor.register(canary.value)
    return redactor


# --- the canaries themselves ----------------------------------------------------------


def test_canaries_cover_the_shapes() -> None:
    values = [c.value for c in CANARIES]
    assert len(CANARIES) >= 30
    assert len({c.name for c in CANARIES}) == len(CANARIES)
    assert any(6 <= len(v) <= 8 for v in values)
    assert any(len(v) >= 4096 for v in values)
    assert any("-----BEGIN PRIVATE KEY-----\n" in v for v in values)
    assert any(v.endswith("\n") and v.count("\n") == 1 for v in values)
    assert any(set(".*+?()[]{}|^$\\") <= set(v) for v in values)
    assert any("${" in v and "%{" in v for v in values)
    assert any('"' in v and "\\" in v for v in values)
    assert any(re.search(r"[\u4e00-\u9fff]", v) for v in values)
    assert any(re.search(r"[\U0001f300-\U0001faff]", v) for v in values)
    assert any(isinstance(json.loads(v), dict) for v in values if v.startswith("{"))
    assert any(" " in v and "\t" in v for v in values)
    assert any(re.match(r"https://[^:]+:[^@]+@", v) for v in values)
    assert any(set("=+/") <= set(v) for v in values)


@pytest.mark.parametrize("canary", CANARIES, ids=[c.name for c in CANARIES])
def test_canary_marker_is_unique(canary: Canary) -> None:
    assert canary.marker and canary.marker in canary.value
    others = [c.name for c in CANARIES if c is not canary and canary.marker in c.value]
    assert others == []


# --- every canary, embedded every way ---------------------------------------------------


def _heredoc(value: str) -> str:
    """How Terraform's plan prints a multi-line string."""
    body = "\n".join("            " + line for line in value.split("\n"))
    return f"      + input  = <<-EOT\n{body}\n        EOT"


def _traceback_text(value: str, redactor: Redactor) -> str:
    def connect() -> None:
        raise RuntimeError(f"could not log in with password {value}")

    try:
        try:
            connect()
        except RuntimeError as exc:
            raise KeyError(value) from exc  # str(KeyError) is the repr of its argument
    except KeyError as exc:
        return redact_exception(exc, redactor)
    raise AssertionError("unreachable")


def _log_text(value: str, redactor: Redactor) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s [%(unit)s]"))
    logger = logging.getLogger(f"test_redact.{id(redactor)}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.error("login with %s / %r failed", value, value, extra={"unit": value})
        try:
            raise ValueError(f"backend said: {value!r} is wrong")
        except ValueError:
            logger.exception("fetch failed: %(secret)s", {"secret": value}, extra={"unit": "x"})
        logger.warning("stack", stack_info=True, extra={"unit": "y"})
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def _embeddings(value: str, redactor: Redactor) -> list[tuple[str, str]]:
    raw = value.encode()
    texts = [
        ("plain", f"password={value} and more"),
        ("json", json.dumps({"db": {"password": value, "user": "app"}})),
        ("json unicode", json.dumps({"db": [value]}, ensure_ascii=False)),
        ("json indented", json.dumps({"v": value}, indent=2)),
        ("url query", f"https://h.example/x?token={quote(value, safe='')}&a=1"),
        ("url query plus", f"GET /login?pw={quote_plus(value)} HTTP/1.1"),
        ("url path", f"https://h.example/{quote(value)}/end"),
        ("python repr", f"Config(password={value!r})"),
        ("terraform plan", f'      + input  = "{_go_quote(value)}"'),
        ("terraform show -json", f'{{"after":{{"input":"{_go_json(value)}"}}}}'),
        ("terraform heredoc", _heredoc(value)),
        ("traceback", _traceback_text(value, redactor)),
        ("logging", _log_text(value, redactor)),
    ]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(raw).decode()
        texts.append((f"{encode.__name__} log line", f"INFO sent {encoded} to the backend"))
        texts.append((f"{encode.__name__} unpadded", f"INFO token={encoded.rstrip('=')};"))
    basic = base64.b64encode(f"admin:{value}".encode()).decode()
    texts.append(("basic auth", f"Authorization: Basic {basic}"))
    for number, line in enumerate(value.split("\n")):
        texts.append((f"line {number} alone", f"  {line}  "))
    return texts


def _problems(canary: Canary, redactor: Redactor, texts: list[tuple[str, str]]) -> list[str]:
    problems = []
    for label, text in texts:
        redacted = redactor.redact(text) if label not in ("traceback", "logging") else text
        leaks = find_leaks([redacted], [canary])
        if leaks:
            problems.append(f"{label}: {leaks}")
        if canary.marker in redacted:
            problems.append(f"{label}: marker survives in {redacted[:200]!r}")
        if redactor.contains_secret(redacted):
            problems.append(f"{label}: a registered form survives in {redacted[:200]!r}")
    return problems


@pytest.mark.parametrize("canary", CANARIES, ids=[c.name for c in CANARIES])
def test_every_form_of_every_canary_is_redacted(canary: Canary, shared: Redactor) -> None:
    solo = Redactor()
    solo.register(canary.value)
    for redactor in (solo, shared):
        assert _problems(canary, redactor, _embeddings(canary.value, redactor)) == []


@pytest.mark.parametrize("canary", CANARIES, ids=[c.name for c in CANARIES])
def test_leak_battery_forms_are_registered(canary: Canary, shared: Redactor) -> None:
    # The battery's forms are computed independently: the redactor must cover all of them.
    assert set(every_form(canary.value)) <= shared.forms(canary.value)
    text = "\n".join(every_form(canary.value))
    assert find_leaks([text], [canary])  # the battery does find them unredacted
    assert find_leaks([shared.redact(text)], CANARIES) == []


def test_find_leaks_searches_files_dirs_and_bytes(tmp_path) -> None:
    canary = next(c for c in CANARIES if c.name == "unicode-cjk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "log.txt").write_bytes(b"\xff\xfe junk " + canary.value.encode())
    (tmp_path / "clean.txt").write_text("nothing here")
    encoded = base64.b64encode(canary.value.encode())
    leaks = find_leaks([tmp_path, b"x" + encoded, "clean"], CANARIES)
    assert {(leak.canary.name, leak.kind) for leak in leaks} == {
        ("unicode-cjk", "plain"),
        ("unicode-cjk", "base64"),
        ("unicode-cjk", "base64 unpadded"),
    }
    assert any("log.txt at byte 8" in leak.where for leak in leaks)


# --- Terraform's own escaping, recorded from Terraform 1.15.5 ---------------------------

# (value, as `terraform plan` prints it, as `terraform show -json` prints it)
TERRAFORM_RECORDED = [
    (
        'q"uo\\te ${inter} %{dir} é 漢 😀 tab\there\x01ctl \x7f del \u200b zw',
        'q\\"uo\\\\te ${inter} %{dir} é 漢 😀 tab\\there\\x01ctl \\x7f del \\u200b zw',
        None,
    ),
    (
        "a<b>c&d é \x01 \b \f \x7f \u2028 \u00a0 z",
        "a<b>c&d é \\x01 \\b \\f \\x7f \\u2028 \\u00a0 z",
        "a\\u003cb\\u003ec\\u0026d é \\u0001 \\b \\f \x7f \\u2028 \u00a0 z",
    ),
]


@pytest.mark.parametrize("value,plan,show_json", TERRAFORM_RECORDED)
def test_terraform_escaping_matches_recorded_output(value, plan, show_json) -> None:
    assert _go_quote(value) == plan
    forms = secret_forms(value)
    assert plan in forms
    if show_json is not None:
        assert _go_json(value) == show_json
        assert show_json in forms
    redactor = Redactor()
    redactor.register(value)
    assert redactor.redact(f'  + o = "{plan}"') == f'  + o = "{MASK}"'


def test_hcl_escaped_form_is_registered() -> None:
    forms = secret_forms("pre${x}mid%{y}post")
    assert "pre$${x}mid%%{y}post" in forms


# --- overlaps, short values, odd inputs --------------------------------------------------


@pytest.mark.parametrize("order", [1, -1])
def test_longest_first_for_a_prefix(order: int) -> None:
    redactor = Redactor()
    for value in ["abcdefgh", "abcdefgh-and-more"][::order]:
        redactor.register(value)
    assert redactor.redact("x abcdefgh-and-more y") == f"x {MASK} y"
    assert redactor.redact("x abcdefgh y") == f"x {MASK} y"
    assert redactor.redact("abcdefgh-and-less") == f"{MASK}-and-less"


def test_overlapping_secrets_leave_no_fragment() -> None:
    redactor = Redactor()
    redactor.register("xx-secret-one")
    redactor.register("one-more-secret")
    assert redactor.redact("[xx-secret-one-more-secret]") == f"[{MASK}]"
    assert redactor.redact("xx-secret-oneone-more-secret") == MASK + MASK


def test_short_value_is_masked_as_a_whole_word(caplog) -> None:
    redactor = Redactor()
    with caplog.at_level(logging.WARNING, logger="agent.core.redact"):
        redactor.register("q7Z")
    assert len(redactor) == 1
    assert redactor.forms("q7Z") == {"q7Z"}
    assert "3 characters" in caplog.text and "q7Z" not in caplog.text
    assert redactor.redact("pw=q7Z, q7Z") == f"pw={MASK}, {MASK}"
    assert redactor.redact("aq7Zb q7Z_x") == "aq7Zb q7Z_x"
    assert MIN_LENGTH == 4


def test_derived_forms_of_a_long_enough_value() -> None:
    forms = secret_forms("ab12\n}\nsecond-line")
    assert "second-line" in forms and "}" not in forms
    assert all(len(form) >= MIN_LENGTH for form in forms)


def test_strings_of_a_json_document_are_registered() -> None:
    key = "\n".join(
        [
            "-----BEGIN PRIVATE KEY-----",
            "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
            "-----END PRIVATE KEY-----",
            "",
        ]
    )
    document = json.dumps({"type": "service_account", "region": "eu-west-1", "private_key": key})
    redactor = Redactor()
    redactor.register(document)
    printed = f"private_key = <<EOT\n{key}EOT\nregion = eu-west-1"
    assert redactor.redact(printed) == "private_key = <<EOT\n***\nEOT\nregion = eu-west-1"
    one_line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"
    assert redactor.redact(f"key: {one_line}") == "key: ***"


@pytest.mark.parametrize("value", ["", " ", "\n\t  "])
def test_empty_or_blank_values_are_not_registered(value: str, caplog) -> None:
    redactor = Redactor()
    with caplog.at_level(logging.WARNING, logger="agent.core.redact"):
        redactor.register(value)
    assert len(redactor) == 0 and "nothing to mask" in caplog.text
    assert redactor.redact("a  b\n") == "a  b\n"


@pytest.mark.parametrize("prefix", ["", "u", "us", "use", "user:"])
@pytest.mark.parametrize("suffix", ["", "x", "xy", ":tail"])
def test_base64_inside_a_longer_blob(prefix: str, suffix: str) -> None:
    value = "blob-secret-Kq81"
    redactor = Redactor()
    redactor.register(value)
    blob = base64.b64encode(f"{prefix}{value}{suffix}".encode()).decode()
    redacted = redactor.redact(f"Basic {blob}")
    # Only the characters that also encode the neighbours' bits are left.
    assert re.fullmatch(r"Basic [A-Za-z0-9+/]{0,8}\*\*\*[A-Za-z0-9+/=]{0,12}", redacted), redacted


def test_redact_bytes_keeps_undecodable_bytes() -> None:
    redactor = Redactor()
    redactor.register("bytes-secret-é")
    data = b"\xff\x00 " + "bytes-secret-é".encode() + b" \xc3"
    assert redactor.redact_bytes(data) == b"\xff\x00 *** \xc3"
    clean = b"\xffclean"
    assert redactor.redact_bytes(clean) is clean


def test_nothing_registered_is_a_no_op() -> None:
    redactor = Redactor()
    assert redactor.redact("abc") == "abc"
    assert not redactor.contains_secret("abc")
    assert redactor.redact_obj({"a": [1, "b"]}) == {"a": [1, "b"]}


def test_register_accepts_a_secret_and_counts_values() -> None:
    redactor = Redactor()
    redactor.register(Secret("from-a-secret-1", source="vault:kv/x#y"))
    redactor.register("from-a-secret-1")
    redactor.register("another-value-2")
    assert len(redactor) == 2
    assert redactor.contains_secret(".. from-a-secret-1 ..")
    assert redactor.redact(Secret("from-a-secret-1", "s")) == MASK  # type: ignore[arg-type]


# --- Terraform's plan JSON ----------------------------------------------------------------


def _shape(obj):
    if isinstance(obj, dict):
        return ("dict", len(obj), [_shape(v) for v in obj.values()])
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [_shape(v) for v in obj])
    return type(obj).__name__


def test_redact_obj_keeps_the_plan_structure() -> None:
    db_pw, token = "db-pw-Zr71x", "tok/en+Q9=="
    plan = {
        "format_version": "1.2",
        "variables": {"db_password": {"value": db_pw}, "port": {"value": 5432}},
        "resource_changes": [
            {
                "address": "terraform_data.a",
                "change": {
                    "actions": ["create"],
                    "before": None,
                    "after": {
                        "input": f"postgres://app:{db_pw}@db:5432",
                        "tags": {
                            db_pw: "as a key",
                            "b64": base64.b64encode(token.encode()).decode(),
                        },
                        "list": [token, 1, 2.5, True, None],
                    },
                    "after_unknown": {"output": True},
                    "after_sensitive": {},
                },
            }
        ],
        "pair": (token, "plain"),
    }
    redactor = Redactor()
    redactor.register(db_pw)
    redactor.register(token)
    redacted = redactor.redact_obj(plan)
    assert _shape(redacted) == _shape(plan)
    text = json.dumps(redacted)
    assert db_pw not in text and token not in text and not redactor.contains_secret(text)
    after = redacted["resource_changes"][0]["change"]["after"]
    assert after["input"] == f"postgres://app:{MASK}@db:5432"
    assert after["tags"] == {MASK: "as a key", "b64": MASK}
    assert after["list"] == [MASK, 1, 2.5, True, None]
    assert redacted["variables"]["port"] == {"value": 5432}
    assert redacted["pair"] == (MASK, "plain")
    assert plan["variables"]["db_password"]["value"] == db_pw  # the input is untouched


def test_redact_obj_numbers_and_secrets() -> None:
    redactor = Redactor()
    redactor.register("48213377")
    assert redactor.redact_obj({"pin": 48213377, "n": 7, "s": Secret("x", "src")}) == {
        "pin": MASK,
        "n": 7,
        "s": MASK,
    }


# --- Secret ----------------------------------------------------------------------------------


@dataclass
class _Holder:
    password: Secret


def test_secret_masks_itself(caplog) -> None:
    secret = Secret("s3cr3t-value", source="vault:kv/prod/db#password")
    assert str(secret) == repr(secret) == MASK
    assert f"{secret}" == MASK and f"{secret!r}" == MASK and f"{secret:>5}" == "  ***"
    assert "%s %r" % (secret, secret) == "*** ***"  # noqa: UP031
    assert "{}".format(secret) == MASK  # noqa: UP032
    assert "s3cr3t" not in repr([secret, {"k": secret}, _Holder(secret)])
    with caplog.at_level(logging.INFO):
        logging.getLogger("test_redact.secret").info("pw %s %r", secret, secret)
    assert "s3cr3t" not in caplog.text and "pw *** ***" in caplog.text
    assert secret.reveal() == "s3cr3t-value"
    assert secret.source == "vault:kv/prod/db#password"


def test_secret_refuses_json_and_pickle() -> None:
    secret = Secret("s3cr3t-value", source="file:/x")
    with pytest.raises(TypeError):
        json.dumps({"pw": secret})
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        Secret(b"bytes", source="x")  # type: ignore[arg-type]
    assert copy.deepcopy(secret) is secret
    assert not hasattr(secret, "__dict__")


def test_secret_equality_and_hash_by_value() -> None:
    a, b, c = Secret("same-1", "src-a"), Secret("same-1", "src-b"), Secret("other", "src-a")
    assert a == b and hash(a) == hash(b) and a != c
    assert a != "same-1"
    assert len({a, b, c}) == 2


# --- logging ------------------------------------------------------------------------------


@pytest.fixture
def installed():
    redactor = Redactor()
    install_logging_redaction(redactor)
    yield redactor
    remove_logging_redaction(redactor)


def test_install_covers_handlers_added_later(installed: Redactor) -> None:
    installed.register("later-secret-9")
    stream = io.StringIO()
    logger = logging.getLogger("test_redact.later")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("a %s b", "later-secret-9", extra={"field": "later-secret-9"})
        try:
            raise OSError("later-secret-9")
        except OSError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "later-secret-9" not in out
    assert "a *** b" in out and "OSError: ***" in out


def test_install_adds_a_filter_to_root_handlers_once() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    redactor = Redactor()
    factory_before = logging.getLogRecordFactory()
    try:
        install_logging_redaction(redactor)
        install_logging_redaction(redactor)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        assert logging.getLogRecordFactory() is not logging.LogRecord
    finally:
        remove_logging_redaction(redactor)
        root.removeHandler(handler)
    assert handler.filters == []
    # Back to what it was (logging.LogRecord, unless another redactor is still installed).
    assert logging.getLogRecordFactory() is factory_before


def test_filter_survives_bad_format_arguments() -> None:
    redactor = Redactor()
    redactor.register("bad-format-secret")
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "%s %s", ("bad-format-secret",), None
    )
    assert RedactingFilter(redactor).filter(record)
    assert "bad-format-secret" not in record.getMessage() and MASK in record.getMessage()


def test_filter_formats_the_traceback_and_drops_exc_info() -> None:
    redactor = Redactor()
    redactor.register("exc-info-secret")
    try:
        raise RuntimeError("exc-info-secret")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "m", None, sys.exc_info())
    record.stack_info = "Stack (most recent call last):\n  exc-info-secret"
    assert RedactingFilter(redactor).filter(record)
    assert record.exc_info is None  # no handler can format the raw exception again
    assert record.exc_text.endswith("RuntimeError: ***")
    assert "exc-info-secret" not in record.stack_info
    assert "exc-info-secret" not in logging.Formatter().format(record)


# --- threads and speed --------------------------------------------------------------------


def test_thread_safety_smoke() -> None:
    redactor = Redactor()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(40):
                value = f"thread{n}-value{i}-xyz"
                redactor.register(value)
                assert redactor.redact(f"<{value}>") == f"<{MASK}>"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(redactor) == 320
    text = " ".join(f"thread{n}-value{i}-xyz" for n in range(8) for i in range(40))
    assert set(redactor.redact(text).split()) == {MASK}
