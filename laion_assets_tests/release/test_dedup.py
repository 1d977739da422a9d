"""Image dedup: the winner rule, order independence, and the multi-index near-duplicate search against brute force."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import xxhash

from laion_assets.core.release.columns import subset_of, url_text_hash, url_text_hash_expr
from laion_assets.core.release.dedup import key_masks, mark_duplicates, near_pairs


def test_hash_is_xxhash64_of_url_nul_text_as_signed_int64():
    got = url_text_hash(["https://a.example/x.jpg", "ab", "a"], ["a cat", "c", "bc"])
    want = xxhash.xxh64_intdigest(b"https://a.example/x.jpg\x00a cat")
    assert got.dtype == np.int64 and int(got[0]) == (want - 2**64 if want >= 2**63 else want)
    assert got[1] != got[2]  # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert [subset_of(x) for x in ("en", "de", "", None)] == ["en", "multi", "nolang", "nolang"]


def test_vectorised_hash_matches_xxhash_on_tricky_strings():
    """The polars-hash expression the pipeline uses gives exactly the reference's int64 on empty, missing,
    unicode (multi-byte, combining, emoji), long and high-digest strings."""
    urls = ["", "", None, "https://ü.example/ß.jpg", "ab", "a", "x" * 5000, "https://a.example/\u00e9", "é", "\t "]
    texts = ["", "t", None, "日本語のキャプション 🎉", "c", "bc", "y" * 3, "e\u0301", None, " \n"]
    got = pl.DataFrame({"u": urls, "t": texts}, schema={"u": pl.String, "t": pl.String}).select(
        url_text_hash_expr(pl.col("u"), pl.col("t")).alias("h"))["h"]
    assert got.dtype == pl.Int64
    digests = [xxhash.xxh64_intdigest((u or "").encode() + b"\x00" + (t or "").encode())
               for u, t in zip(urls, texts, strict=True)]
    want = [d - 2**64 if d >= 2**63 else d for d in digests]
    assert got.to_list() == want == url_text_hash(urls, texts).tolist()
    assert any(h < 0 for h in want)  # the sign conversion is exercised
    rng = np.random.default_rng(3)
    many = ["".join(map(chr, rng.integers(1, 0x2FFF, int(n)))) for n in rng.integers(0, 40, 2000)]
    got = pl.DataFrame({"u": many, "t": many[::-1]}).select(url_text_hash_expr(pl.col("u"), pl.col("t")))
    assert got.to_series().to_list() == url_text_hash(many, many[::-1]).tolist()


def _clustered_hashes(n: int, seed: int) -> list[int]:
    """Random 64-bit hashes, a third of them a few bits from an earlier one (clusters that chain)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(n):
        if out and rng.random() < 0.35:
            h = out[int(rng.integers(0, len(out)))]
            for bit in rng.choice(64, int(rng.integers(0, 7)), replace=False):
                h ^= 1 << int(bit)
        else:
            h = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        out.append(h)
    return out


@pytest.mark.parametrize("radius", [0, 2, 4, 6])
def test_multi_index_search_finds_exactly_the_pairs_brute_force_finds(radius):
    hashes = sorted(set(_clustered_hashes(1500, radius)))
    got = near_pairs(pl.DataFrame({"h": pl.Series(hashes, dtype=pl.UInt64)}), radius)
    found = {(a, b) for a, b in got.iter_rows()}
    arr = np.array(hashes, dtype=np.uint64)
    xor = arr[:, None] ^ arr[None, :]
    bits = np.unpackbits(xor.view(np.uint8), axis=1).reshape(len(arr), len(arr), 64).sum(axis=2)
    i, j = np.nonzero((bits <= radius) & ~np.eye(len(arr), dtype=bool))
    assert found == {(int(arr[a]), int(arr[b])) for a, b in zip(i, j, strict=True)}
    assert len(key_masks(4)) == 35  # 7 blocks, 3 of them matched: C(7, 3)


def test_winners_are_the_first_by_crawl_bucket_key_whatever_the_input_order():
    ids = ["C1/0001/000000009", "C1/0000/000000003", "C0/0003/000000001", "C1/0000/000000001", "C1/0002/000000000"]
    sha = ["aa", "aa", "bb", "cc", "aa"]
    phash = ["ffff0000ffff0000", "0000000000000001", "0000000000000003", "0000000000000000", "00000000000000ff"]
    frame = pl.DataFrame({"sample_id": ids, "sha256": sha, "phash": phash})
    first, counts = mark_duplicates(frame, 4)
    for seed in range(5):
        again, _ = mark_duplicates(frame.sample(fraction=1.0, shuffle=True, seed=seed), 4)
        assert again.equals(first)
    marks = {r["sample_id"]: (r["duplicate_of"], r["near_duplicate_of"]) for r in first.to_dicts()}
    # Same bytes: the earliest of C1/0000/3, C1/0001/9, C1/0002/0 wins.
    assert marks["C1/0001/000000009"] == ("C1/0000/000000003", None)
    assert marks["C1/0002/000000000"] == ("C1/0000/000000003", None)
    # Near (within 4 bits), among exact winners: the earlier crawl's sample wins, then the smaller bucket and key.
    assert marks["C1/0000/000000001"] == (None, "C0/0003/000000001")
    assert marks["C1/0000/000000003"] == (None, "C0/0003/000000001")
    assert marks["C0/0003/000000001"] == (None, None)
    assert (counts.exact_duplicates, counts.near_duplicates) == (2, 2)


def test_missing_hashes_match_nothing_and_a_negative_radius_is_refused():
    frame = pl.DataFrame({"sample_id": ["a", "b", "c"], "sha256": [None, None, "x"], "phash": [None, None, "zz"]})
    out, counts = mark_duplicates(frame, 4)
    assert counts.exact_duplicates == counts.near_duplicates == 0
    with pytest.raises(ValueError, match="radius"):
        mark_duplicates(frame, -1)


def _brute_force_marks(frame: pl.DataFrame, radius: int) -> dict[str, tuple[str | None, str | None]]:
    """The winner rule, written out over all pairs (small inputs only)."""
    rows = sorted(frame.rows(), key=lambda r: tuple(r[0].split("/")))
    marks: dict[str, tuple[str | None, str | None]] = {}
    first_bytes: dict[str, str] = {}
    winners: list[tuple[str, int]] = []
    for sample, sha, phash in rows:
        dup = first_bytes.get(sha) if sha is not None else None
        if sha is not None:
            first_bytes.setdefault(sha, sample)
        near = None
        if dup is None and phash is not None:
            h = int(phash, 16)
            near = next((s for s, other in winners if bin(h ^ other).count("1") <= radius), None)
            winners.append((sample, h))
        marks[sample] = (dup, near)
    return marks


@pytest.mark.parametrize("radius", [0, 4])
def test_spilled_partitions_mark_exactly_what_the_rule_says(radius):
    """Thousands of samples over two crawls and many buckets, with copied bytes, near pHashes, missing digests and
    deduped with partitions of 400 rows (8 partitions, dozens of spilled files): the marks equal the rule
    applied over all pairs, and equal those of one in-memory partition."""
    rng = np.random.default_rng(radius)
    n = 2000
    hashes = _clustered_hashes(n, seed=11)
    shas = [f"{int(rng.integers(0, 400)):064x}" if rng.random() < 0.3 else f"{i:064x}" for i in range(n)]
    ids = [f"C{int(rng.integers(0, 2))}/{int(rng.integers(0, 12)):04d}/{i:09d}" for i in rng.permutation(n)]
    frame = pl.DataFrame({
        "sample_id": ids,
        "sha256": [None if rng.random() < 0.03 else s for s in shas],
        "phash": [None if rng.random() < 0.03 else f"{h:016x}" for h in hashes]})
    spilled, counts = mark_duplicates(frame, radius, partition_rows=400)
    whole, _ = mark_duplicates(frame, radius)
    assert spilled.equals(whole)
    want = _brute_force_marks(frame, radius)
    got = {r["sample_id"]: (r["duplicate_of"], r["near_duplicate_of"]) for r in spilled.to_dicts()}
    assert got == want
    assert counts.exact_duplicates > 50 and (radius == 0 or counts.near_duplicates > 50)


def test_the_join_gives_the_same_rows_with_keys_that_are_not_numbers():
    """The join runs on the keys as sorted integers when they are digits (the download's keys) and on the key
    strings otherwise: both give the same rows in the same order; a language score that cannot be taken by position
    (the unique pairs shuffled) is joined by URL with the same result."""
    from laion_assets.core.release.filtered import build_filtered
    from laion_assets.offline.release_inputs import bucket_inputs

    inputs = bucket_inputs(3000, 0, seed=5)
    tables = [pl.from_arrow(t) for t in (inputs.rows, inputs.scores, inputs.safety, inputs.watermark)]
    pairs = pl.from_arrow(inputs.pairs).select("url", "language_score")
    marks = tables[1].filter(pl.col("keep")).select(
        "key", pl.lit("C/0/1").alias("duplicate_of"), pl.lit(None, pl.String).alias("near_duplicate_of"))
    rows, shard = tables[0].select(*DOWNLOAD_COLUMNS), pl.lit("0000/00000.tar").alias("shard")
    digits, _ = build_filtered("C", "0", rows.with_columns(shard), *tables[1:], pairs, marks)
    lettered = [t.with_columns(pl.concat_str(pl.lit("k"), "key").alias("key"))
                for t in [rows.with_columns(shard), *tables[1:], marks]]
    shuffled = pairs.sample(fraction=1.0, shuffle=True, seed=1)
    strings, _ = build_filtered("C", "0", *lettered[:4], shuffled, lettered[4])
    assert digits.height > 1000 and digits["language_score"].null_count() == 0
    assert strings.with_columns(pl.col("key").str.slice(1)).equals(digits)


DOWNLOAD_COLUMNS = ["key", "url", "caption", "status", "original_width", "original_height", "sha256", "phash",
                    "language"]
