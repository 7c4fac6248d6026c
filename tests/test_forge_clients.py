"""The forge clients against the forge stand-in, over a real socket (no mocks).

Each test runs for GitHub, GitLab and Gitea: what the forge receives (state names, auth
header, paths), and that a comment is created once and then updated in place.
"""

from __future__ import annotations

import socket

import pytest

from providers.errors import ForgeError
from providers.forge import MAX_COMMENT_CHARS, comment_text, make_client, marker_line
from tests.support.forge_standin import ForgeStandin

KINDS = ("github", "gitlab", "gitea")
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "ghp_canaryTOKEN0123456789"
REPO = {"github": "acme/infra", "gitea": "acme/infra", "gitlab": "acme/platform/infra"}


@pytest.fixture(params=KINDS)
def forge(request: pytest.FixtureRequest):
    with ForgeStandin(request.param, token=TOKEN) as standin:
        yield standin


def client_for(forge: ForgeStandin, token: str = TOKEN):
    return make_client(forge.kind, forge.api_url, REPO[forge.kind], token, timeout=5)  # type: ignore[arg-type]


def test_status_is_posted_with_the_forge_state_names(forge: ForgeStandin) -> None:
    client = client_for(forge)
    client.set_status(SHA, "pending", "planning", "gitops-agent/plan")
    client.set_status(SHA, "failure", "network: failed", "gitops-agent/plan", "http://x/run/1")
    posted = forge.statuses(SHA)
    expected = ["pending", "failed"] if forge.kind == "gitlab" else ["pending", "failure"]
    assert [s["state"] for s in posted] == expected
    context_key = "name" if forge.kind == "gitlab" else "context"
    assert {s[context_key] for s in posted} == {"gitops-agent/plan"}
    assert posted[1]["target_url"] == "http://x/run/1"
    assert all(r.authorized for r in forge.requests)


def test_a_long_description_is_cut_to_what_github_accepts(forge: ForgeStandin) -> None:
    client_for(forge).set_status(SHA, "success", "x" * 500, "gitops-agent")
    (posted,) = forge.statuses(SHA)
    assert len(posted["description"]) == 140
    assert posted["description"].endswith("…")


def test_gitlab_same_state_twice_is_not_an_error() -> None:
    with ForgeStandin("gitlab", token=TOKEN) as forge:
        client = client_for(forge)
        client.set_status(SHA, "pending", "planning", "gitops-agent")
        client.set_status(SHA, "pending", "planning again", "gitops-agent")
        assert [r.status for r in forge.requests if "statuses" in r.path] == [201, 400]
        assert len(forge.statuses(SHA)) == 1


def test_gitlab_project_path_is_url_encoded() -> None:
    with ForgeStandin("gitlab", token=TOKEN) as forge:
        client_for(forge).set_status(SHA, "success", "ok", "gitops-agent")
        (request,) = forge.requests
        assert request.path == f"/projects/acme%2Fplatform%2Finfra/statuses/{SHA}"


def test_upsert_creates_one_comment_then_updates_it_in_place(forge: ForgeStandin) -> None:
    client = client_for(forge)
    client.upsert_comment(42, "plan", "first plan")
    (first,) = forge.comments(42)
    client.upsert_comment(42, "plan", "second plan")
    (second,) = forge.comments(42)
    assert second.id == first.id
    assert second.body == marker_line("plan") + "\nsecond plan"
    # The same text again: nothing is sent but the lookups.
    before = len(forge.requests)
    client.upsert_comment(42, "plan", "second plan")
    assert all(r.method == "GET" for r in forge.requests[before:])
    # Another marker is another comment.
    client.upsert_comment(42, "outcome", "applied")
    assert len(forge.comments(42)) == 2


def test_a_comment_quoting_our_marker_by_someone_else_is_left_alone(forge: ForgeStandin) -> None:
    forge.add_comment(7, "they wrote\n" + marker_line("plan"), author="mallory")
    client = client_for(forge)
    client.upsert_comment(7, "plan", "our plan")
    comments = forge.comments(7)
    assert [c.author for c in comments] == ["mallory", "gitops-bot"]
    assert comments[0].body.startswith("they wrote")


def test_without_whoami_the_marker_alone_finds_the_comment() -> None:
    # A GitHub App installation token gets 403 from GET /user.
    with ForgeStandin("github", token=TOKEN, whoami_status=403) as forge:
        client = client_for(forge)
        client.upsert_comment(3, "plan", "one")
        client.upsert_comment(3, "plan", "two")
        (comment,) = forge.comments(3)
        assert comment.body.endswith("\ntwo")


def test_our_comment_is_found_beyond_the_first_page(forge: ForgeStandin) -> None:
    client = client_for(forge)
    for n in range(120):
        forge.add_comment(5, f"chatter {n}", author="someone")
    client.upsert_comment(5, "plan", "one")
    client.upsert_comment(5, "plan", "two")
    ours = [c for c in forge.comments(5) if c.author == "gitops-bot"]
    assert len(ours) == 1 and ours[0].body.endswith("\ntwo")


def test_a_huge_body_is_cut_to_the_comment_limit(forge: ForgeStandin) -> None:
    client_for(forge).upsert_comment(9, "plan", "line\n" * 40000)
    (comment,) = forge.comments(9)
    assert len(comment.body) <= MAX_COMMENT_CHARS
    assert "more characters" in comment.body and "agent logs" in comment.body
    assert comment.body.startswith(marker_line("plan"))


def test_comment_text_keeps_a_short_body_whole() -> None:
    assert comment_text("m", "hello") == "<!-- gitops-agent:m -->\nhello"
    with pytest.raises(ValueError):
        marker_line("x --> <script>")


def test_a_wrong_token_is_an_error_naming_forge_endpoint_and_status(forge: ForgeStandin) -> None:
    client = client_for(forge, token="wrong-token-value")
    with pytest.raises(ForgeError) as caught:
        client.set_status(SHA, "success", "ok", "gitops-agent")
    err = caught.value
    assert err.status == 401 and err.forge == forge.kind and not err.retryable
    assert str(err).startswith(f"{forge.kind}: POST ")
    assert "HTTP 401" in str(err)
    assert "wrong-token-value" not in str(err) and "wrong-token-value" not in repr(client)


def test_a_server_error_is_retryable_and_never_shows_the_token(forge: ForgeStandin) -> None:
    forge.fail_next(502)
    with pytest.raises(ForgeError) as caught:
        client_for(forge).set_status(SHA, "success", "ok", "gitops-agent")
    assert caught.value.status == 502 and caught.value.retryable
    assert TOKEN not in str(caught.value)


def test_githubs_secondary_rate_limit_is_retryable() -> None:
    # 403 with Retry-After: GitHub's secondary rate limit, not a refusal.
    with ForgeStandin("github", token=TOKEN) as forge:
        forge.fail_next(403, headers={"Retry-After": "30"})
        forge.fail_next(403)
        client = client_for(forge)
        with pytest.raises(ForgeError) as limited:
            client.set_status(SHA, "success", "ok", "gitops-agent")
        with pytest.raises(ForgeError) as refused:
            client.set_status(SHA, "success", "ok", "gitops-agent")
    assert limited.value.retryable and not refused.value.retryable


def test_a_forge_that_does_not_answer_times_out() -> None:
    # A listening socket that never answers: the client gives up after its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        client = make_client("gitea", f"http://127.0.0.1:{port}/api/v1", "a/b", TOKEN, timeout=0.5)
        with pytest.raises(ForgeError) as caught:
            client.set_status(SHA, "success", "ok", "gitops-agent")
    assert caught.value.retryable and caught.value.status is None
    assert "no answer within 0.5s" in str(caught.value)


@pytest.mark.parametrize(
    ("kind", "url", "repo", "expected"),
    [
        ("gitlab", None, "a/b", "API URL is required"),
        ("github", None, "just-a-name", "expected OWNER/NAME"),
        ("gitea", "http://127.0.0.1:1/api/v1", "a/b/c", "expected OWNER/NAME"),
        ("bitbucket", "http://127.0.0.1:1", "a/b", "expected one of github, gitlab, gitea"),
    ],
)
def test_make_client_refuses_bad_settings(kind, url, repo, expected) -> None:
    with pytest.raises(ValueError, match=expected):
        make_client(kind, url, repo, TOKEN)
