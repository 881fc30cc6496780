"""The HTML duplicate report: groups and thumbnails read back from the shards, on real sample photos."""

from __future__ import annotations

import base64
import io
import os
import re

import dask
import numpy as np
import pytest
from conftest import seeded_checkpoint
from PIL import Image

from imgcurate import ImageTextPairDataset
from imgcurate.dedup import ExactDuplicates, SemanticDeduplicator
from imgcurate.io.make import Record, write_shards
from imgcurate.report import duplicate_groups
from imgcurate.testing import encode_image


def _figures(page: str) -> dict[str, tuple[np.ndarray | None, str]]:
    """key -> (thumbnail pixels or None for a placeholder, caption text) for every figure on the page."""
    out = {}
    for body in re.findall(r"<figure>(.*?)</figure>", page, flags=re.S):
        key = re.search(r"<figcaption><b>(.*?)</b>", body).group(1)
        data = re.search(r'src="data:image/jpeg;base64,([^"]+)"', body)
        pixels = None if data is None else np.asarray(Image.open(io.BytesIO(base64.b64decode(data.group(1)))))
        out[key] = (pixels, re.sub(r"<[^>]+>", " ", body))
    return out


def test_exact_duplicates_report_shows_every_group_with_its_own_images(sample_ds, tmp_path):
    ds = ExactDuplicates()(sample_ds)
    df = ds.metadata.compute()
    flagged = df[df.exact_duplicate]
    assert len(flagged) > 0
    (tmp_path / "report").mkdir()
    path = duplicate_groups(ds, str(tmp_path / "report" / "dups.html"), thumb_size=64)
    page = open(path, encoding="utf-8").read()
    assert os.listdir(tmp_path / "report") == ["dups.html"]  # written under a temporary name, then renamed
    figures = _figures(page)
    assert f"{len(flagged)} of {len(df)} samples flagged" in page
    assert page.count("<section>") == flagged.exact_duplicate_of.nunique()
    for _, row in flagged.iterrows():
        copy, original = figures[row.key][0], figures[row.exact_duplicate_of][0]
        assert copy is not None and max(copy.shape[:2]) <= 64
        assert np.array_equal(copy, original)  # byte-identical images make identical thumbnails
    one = open(duplicate_groups(ds, str(tmp_path / "report" / "one.html"), max_groups=1), encoding="utf-8").read()
    biggest = flagged.exact_duplicate_of.value_counts()
    assert one.count("<section>") == 1 and f"{biggest.iloc[0]} duplicate(s) of" in one
    # the thumbnails are of the samples' own photos, not of some other image
    by_source = df.set_index("key").source
    thumbs = {k: p for k, (p, _) in figures.items()}
    means = {k: thumbs[k].mean() for k in thumbs}
    for a in thumbs:
        for b in thumbs:
            if by_source[a] != by_source[b]:
                assert thumbs[a].shape != thumbs[b].shape or abs(means[a] - means[b]) > 0.01 or a == b


@pytest.mark.parametrize("mode", ["greedy", "connected"])
def test_semantic_report_has_the_histogram_groups_and_the_borderline_pairs(sample_ds, tmp_path, mode):
    from imgcurate.embedders import TimmImageEmbedder

    weights = seeded_checkpoint(tmp_path, "test_resnet")
    with dask.config.set(scheduler="sync"):
        ds = TimmImageEmbedder("test_resnet", checkpoint_path=weights, batch_size=8)(sample_ds)
        ds = SemanticDeduplicator(n_clusters=4, eps=1e-4, mode=mode)(ds)
        path = duplicate_groups(ds, str(tmp_path / "sem.html"), borderline=5, max_per_group=1)
    df = ds.metadata.compute()
    page = open(path, encoding="utf-8").read()
    assert 'class="plot" alt="plot" src="data:image/png;base64,' in page
    compared = df[df.max_similarity.notna()]
    assert f"counts {int((~compared.is_duplicate).sum())} kept and {int(compared.is_duplicate.sum())} flagged" in page
    figures = _figures(page)
    groups = df[df.is_duplicate].groupby("duplicate_of").size()
    assert page.count("<section>") == len(groups)
    for target, size in groups.items():
        assert target in figures and f"{size} duplicate(s) of {target}" in page
        if size > 1:
            assert f"and {size - 1} more" in page  # max_per_group=1
    near = df[~df.is_duplicate & df.max_similarity.notna()].nlargest(5, "max_similarity")
    section = page.split("Most similar pairs that were not flagged (5)")[1]
    for _, row in near.iterrows():
        assert f"<b>{row.key}</b> similarity {row.max_similarity:.6g}" in section
        assert f"<b>{row.duplicate_of}</b>" in section


def test_a_report_replaces_an_earlier_report_but_never_a_file_of_another_kind(sample_ds, sample_dir, tmp_path):
    """A report path that names a shard by mistake leaves the shard as it was; an earlier report is replaced."""
    ds = ExactDuplicates()(sample_ds)
    tar = sample_dir / "00000.tar"
    before = tar.read_bytes()
    with pytest.raises(FileExistsError, match=r"00000\.tar: holds a file that is not an HTML page"):
        duplicate_groups(ds, str(tar))
    assert tar.read_bytes() == before
    page = tmp_path / "dups.html"
    duplicate_groups(ds, str(page), max_groups=1)
    first = page.read_text(encoding="utf-8")
    duplicate_groups(ds, str(page))
    assert page.read_text(encoding="utf-8").count("<section>") > first.count("<section>") == 1


def test_an_undecodable_duplicate_gets_a_placeholder(tmp_path):
    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    broken = b"\xff\xd8 not really a jpeg"
    records = [Record({"jpg": photo}, caption="red"), Record({"jpg": broken}), Record({"jpg": broken})]
    write_shards(records, str(tmp_path / "in"), samples_per_shard=2)
    ds = ExactDuplicates()(ImageTextPairDataset.from_webdataset(str(tmp_path / "in")))
    page = open(duplicate_groups(ds, str(tmp_path / "dups.html")), encoding="utf-8").read()
    figures = _figures(page)
    keys = ds.metadata.compute().key.tolist()
    assert figures[keys[1]][0] is None and figures[keys[2]][0] is None and "no image" in page


def test_control_characters_of_a_caption_are_not_written_into_the_page(tmp_path):
    """HTML allows no NUL or BEL (browsers show boxes, parsers may stop): such characters of a caption are written as
    the replacement character; tab and newline stay."""
    photo = encode_image(Image.new("RGB", (40, 30), (200, 30, 30)), "jpg")
    records = [Record({"jpg": photo}, caption="a\x00b\x07c\td"), Record({"jpg": photo}, caption="copy \u202egpj.exe")]
    write_shards(records, str(tmp_path / "in"), samples_per_shard=2)
    ds = ExactDuplicates()(ImageTextPairDataset.from_webdataset(str(tmp_path / "in")))
    page = open(duplicate_groups(ds, str(tmp_path / "dups.html")), encoding="utf-8").read()
    assert "a\ufffdb\ufffdc\td" in page and not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", page)
    # a right-to-left override would show the caption reversed ("exe.jpg"), and the text after it too
    assert "copy \ufffdgpj.exe" in page and not re.search("[\u202a-\u202e\u2066-\u2069]", page)


def test_the_groups_shown_do_not_depend_on_the_sharding_when_sizes_tie(tmp_path):
    """Eight groups of one copy each, three shown: the same three (the first keys) in one shard or in eight."""
    photos = [encode_image(Image.new("RGB", (20, 20), (30 * i, 10, 10)), "png") for i in range(8)]
    records = [Record({"png": photo}, caption=f"photo {i}") for i, photo in enumerate(photos)]
    records += [Record({"png": photo}, caption=f"copy {i}") for i, photo in enumerate(photos)]
    shown = []
    for per_shard in (16, 2):
        folder = tmp_path / f"in-{per_shard}"
        write_shards(records, str(folder), samples_per_shard=per_shard)
        ds = ExactDuplicates()(ImageTextPairDataset.from_webdataset(str(folder)))
        page = open(duplicate_groups(ds, str(tmp_path / f"{per_shard}.html"), max_groups=3), encoding="utf-8").read()
        targets = re.findall(r"<h3>1 duplicate\(s\) of (.*?)</h3>", page)
        captions = {k: c for k, (_, c) in _figures(page).items()}
        shown.append([re.search(r"photo \d+", captions[t]).group(0) for t in targets])  # keys differ by sharding
    assert shown[0] == shown[1] == ["photo 0", "photo 1", "photo 2"]


def test_a_dataset_without_dedup_columns_is_a_clear_error(sample_ds, tmp_path):
    (tmp_path / "report").mkdir()
    with pytest.raises(ValueError, match="no dedup columns .*is_duplicate \\+ duplicate_of"):
        duplicate_groups(sample_ds, str(tmp_path / "report" / "x.html"))
    assert not os.listdir(tmp_path / "report")


def test_a_group_whose_kept_sample_was_filtered_out_still_shows(sample_ds, tmp_path):
    ds = ExactDuplicates()(sample_ds).persist()
    targets = set(ds.metadata.compute().exact_duplicate_of.dropna())
    df = ds.metadata
    ds = ds.with_metadata(df[~df.key.isin(targets)])  # row filters keep the partitioning
    page = open(duplicate_groups(ds, str(tmp_path / "dups.html")), encoding="utf-8").read()
    assert page.count("not in the metadata") == len(targets) > 0
    figures = _figures(page)
    assert all(figures[t][0] is None for t in targets)  # no row, so no place in a shard to read it from


def test_text_drawn_on_the_score_charts_is_never_read_as_math():
    """Matplotlib reads text between two ``$`` as math ("price between $5 and $10" drew "price between 5and10")."""
    from matplotlib.text import Text

    from imgcurate.reports.scores import _plain

    for reason in ("price between $5 and $10", "cost$ > $3", "plain"):
        shown, math = Text(text=_plain(reason))._preprocess_math(_plain(reason))
        assert math is False and shown == reason
