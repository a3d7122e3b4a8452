"""Fuzzing: schemathesis against the app's own OpenAPI schema, and property tests of malformed tensors.

The one property everywhere: bad input is answered with a 4xx and `{"error": ...}`, never a 5xx.
Each fuzzed route and property gets `PRIVOFFLOAD_FUZZ_EXAMPLES` examples (default 100, about 20 s
in all on 2 cores); set it to thousands for a deeper run before a release.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

from .cloud_helpers import ADMIN, MODEL, TOKEN, auth, make_repo, serve
from privoffload import oip
from privoffload.cloud.app import create_app
from privoffload.cloud.auth import Tokens
from privoffload.config import ServeConfig

schema = schemathesis.openapi.from_dict(create_app(ServeConfig(), Tokens.of(TOKEN, ADMIN)).openapi())
EXAMPLES = int(os.environ.get("PRIVOFFLOAD_FUZZ_EXAMPLES", "100"))
BUDGET = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, weights):
    repo = make_repo(tmp_path_factory.mktemp("repo"), [weights["c1"], weights["c2"]])
    with serve(repo, serve_weights=True, max_body_mb=0.5) as server:
        yield server


def flatmap_path_parameters(ctx, params):
    """Often aim at the model and versions that exist, so that generated bodies reach the tensor parser."""
    if not isinstance(params, dict) or "name" not in params:
        return st.just(params)
    keys = {"name": st.sampled_from([params["name"], MODEL, MODEL])}
    if "version" in params:
        keys["version"] = st.sampled_from([params["version"], "1", "2"])
    return st.fixed_dictionaries({**{k: st.just(v) for k, v in params.items()}, **keys})


@schema.hooks.apply(flatmap_path_parameters)
@schema.parametrize()
@BUDGET
def test_openapi_schema_fuzz(case, fuzzed):
    """Every route with generated (valid and invalid) parameters and bodies, with the admin token."""
    case.call_and_validate(base_url=fuzzed.url, headers=auth(ADMIN), timeout=30, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
        negative_data_rejection, ignored_auth])


def post(server, body: bytes, headers: dict | None = None) -> httpx.Response:
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers={**auth(), **(headers or {})}, timeout=30)
    assert r.status_code < 500, r.text[:300]
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str)
    return r


datatypes = st.sampled_from([*oip.DATATYPES, "FP32", "UINT8", "UINT8", "float32", "", "BF16"])
shapes = st.one_of(
    st.lists(st.integers(-2, 40), max_size=6),
    st.tuples(st.integers(-1, 300), st.sampled_from([1, 3, 4]), st.sampled_from([31, 32]), st.just(32)).map(list),
    st.just([1, 3, 32, 32]),
    st.lists(st.integers(0, 2**64), min_size=1, max_size=4),
)


@given(datatype=datatypes, shape=shapes, size=st.one_of(st.none(), st.integers(-5, 2**66)),
       payload=st.binary(max_size=7000), cut=st.integers(0, 8000), extra=st.dictionaries(st.text(max_size=8), st.integers()))
@BUDGET
def test_malformed_binary_tensors_never_5xx(fuzzed, datatype, shape, size, payload, cut, extra):
    """Binary bodies: random datatypes and shapes, declared sizes that lie, truncated tails, junk parameters."""
    params = {**extra, "binary_data_size": len(payload) if size is None else size}
    head = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": shape, "parameters": params}]}).encode()
    body = (head + payload)[:len(head) + cut]
    assert post(fuzzed, body, {oip.HEADER_LENGTH: str(len(head))}).status_code < 500


@given(n=st.integers(1, 3), datatype=st.sampled_from(["FP32", "UINT8"]),
       values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                                 st.booleans(), st.text(max_size=3), st.none()), min_size=1, max_size=5),
       drop=st.integers(0, 3), nest=st.booleans())
@BUDGET
def test_malformed_json_tensors_never_5xx(fuzzed, n, datatype, values, drop, nest):
    """JSON data: NaN, infinities, huge integers, strings, nulls, wrong lengths, ragged nesting."""
    count = n * 3072 - drop
    data = (values * (count // len(values) + 1))[:count]
    if nest:
        data = [data[: len(data) // 2], data[len(data) // 2:] + [0]]
    text = json.dumps({"inputs": [{"name": "images", "datatype": datatype, "shape": [n, 3, 32, 32], "data": data}]})
    r = post(fuzzed, text.encode())
    if drop or nest:
        assert r.status_code == 400


@given(body=st.binary(max_size=2000), header=st.one_of(st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=6)),
       encoding=st.sampled_from([None, "gzip", "deflate", "identity", "br", "GZIP"]))
@BUDGET
def test_random_bodies_never_5xx(fuzzed, body, header, encoding):
    headers = {}
    if header is not None:
        headers[oip.HEADER_LENGTH] = header
    if encoding:
        headers["Content-Encoding"] = encoding
    assert post(fuzzed, body, headers).status_code < 500


def test_compressed_tensors_are_accepted_and_truncated_ones_refused(fuzzed):
    pixels = np.arange(3072, dtype=np.uint8).reshape(1, 3, 32, 32)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                   "parameters": {"binary_data_size": 3072}}]}).encode()
    body, headers = head + pixels.tobytes(), {oip.HEADER_LENGTH: str(len(head))}
    assert post(fuzzed, gzip.compress(body), {**headers, "Content-Encoding": "gzip"}).status_code == 200
    assert post(fuzzed, zlib.compress(body), {**headers, "Content-Encoding": "deflate"}).status_code == 200
    assert post(fuzzed, gzip.compress(body)[:-20], {**headers, "Content-Encoding": "gzip"}).status_code == 400
    trailing = post(fuzzed, gzip.compress(body) + b"smuggled", {**headers, "Content-Encoding": "gzip"})
    assert trailing.status_code == 400 and "follow the end" in trailing.json()["error"]
    assert post(fuzzed, zlib.compress(body)[:-20], {**headers, "Content-Encoding": "deflate"}).status_code == 400
