"""Sources: folder trees with sidecar captions, CSV/JSONL manifests, webdataset-style tar shards."""

import json

import pytest

from datasets_tools.sources import Sample, SourceError, expand_braces, list_source, source_root
from test_dataset_helpers import image_bytes, json_bytes, make_tar, noise_image


def test_folder_order_ids_and_sidecars(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    noise_image(8, 8, 0).save(tmp_path / "b" / "c" / "z.PNG")
    noise_image(8, 8, 1).save(tmp_path / "a.jpg")
    noise_image(8, 8, 2).save(tmp_path / "b" / "x.webp")
    noise_image(8, 8, 3).save(tmp_path / "b" / "x.tiff")  # same stem as x.webp → ids keep the extension
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "a.txt").write_text("  a caption \n", encoding="utf-8")
    (tmp_path / "b" / "c" / "z.json").write_text(json.dumps({"text": "from json"}))
    (tmp_path / "b" / "x.txt").write_bytes(b"\xff\xfe not utf-8")
    samples = list_source(tmp_path)
    assert [s.id for s in samples] == ["a", "b/c/z", "b/x.tiff", "b/x.webp"]
    assert samples[0].read_caption() == ("a caption", None)
    assert samples[1].read_caption() == ("from json", None)
    caption, warning = samples[2].read_caption()
    assert caption == "" and "x.txt" in warning and "UTF-8" in warning
    assert samples[0].read_bytes() == (tmp_path / "a.jpg").read_bytes()
    assert [s.id for s in list_source(tmp_path, limit=2)] == ["a", "b/c/z"]


def test_manifest_csv_and_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        noise_image(8, 8, i).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,caption,id\nimgs/0.png,zero,\nimgs/1.png,\"one, with comma\",custom\n")
    samples = list_source(tmp_path / "m.csv")
    assert [(s.id, s.read_caption()[0]) for s in samples] == [("imgs/0", "zero"), ("custom", "one, with comma")]
    assert [s.source for s in samples] == ["imgs/0.png", "imgs/1.png"]  # relative to the manifest's folder
    assert samples[1].read_bytes() == (tmp_path / "imgs" / "1.png").read_bytes()
    lines = [{"path": str(tmp_path / "imgs" / "2.png"), "caption": "abs"}, {"url": "s3://bkt/k/9.jpg"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples = list_source(tmp_path / "m.jsonl")
    assert samples[0].read_caption() == ("abs", None)
    assert samples[1].id == "bkt/k/9" and samples[1].source == "s3://bkt/k/9.jpg"
    (tmp_path / "dup.csv").write_text("path,id\nimgs/0.png,a\nimgs/1.png,a\n")
    with pytest.raises(SourceError, match="line 3.*already used on line 2"):
        list_source(tmp_path / "dup.csv")
    (tmp_path / "bad.csv").write_text("file,caption\nx.png,y\n")
    with pytest.raises(SourceError, match="'path' or 'url'"):
        list_source(tmp_path / "bad.csv")


def test_tar_shards_and_braces(tmp_path):
    assert expand_braces("s-{00..02}.tar") == ["s-00.tar", "s-01.tar", "s-02.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    make_tar(tmp_path / "shard-000.tar", {"k1.jpg": image_bytes(8, 8, 0, "JPEG"), "k1.txt": b"first",
                                          "k0.png": image_bytes(8, 8, 1), "k0.json": json_bytes({"caption": "zero"}),
                                          "orphan.txt": b"no image"})
    make_tar(tmp_path / "shard-001.tar", {"k2.cls.png": image_bytes(8, 8, 2), "k2.txt": b"\xff bad"})
    samples = list_source(str(tmp_path / "shard-{000..001}.tar"))
    assert [s.id for s in samples] == ["shard-000/k0", "shard-000/k1", "shard-001/k2"]
    assert samples[0].read_caption() == ("zero", None)
    assert samples[1].read_caption() == ("first", None)
    assert samples[1].read_bytes() == image_bytes(8, 8, 0, "JPEG")
    assert samples[1].source == "shard-000.tar::k1.jpg"  # relative to the shards' folder
    caption, warning = samples[2].read_caption()
    assert caption == "" and "k2.txt" in warning
    with pytest.raises(SourceError, match="shard-002.tar: no such tar shard"):
        list_source(str(tmp_path / "shard-{000..002}.tar"))


def test_missing_source(tmp_path):
    with pytest.raises(SourceError, match="no such folder or file"):
        list_source(tmp_path / "nope")


def test_roots_and_relative_plan_records(tmp_path):
    assert source_root(tmp_path) == str(tmp_path)
    assert source_root(tmp_path / "m.jsonl") == str(tmp_path)
    assert source_root(str(tmp_path / "d" / "s-{0..1}.tar")) == str(tmp_path / "d")
    assert source_root(str(tmp_path / "{a,b}" / "s.tar")) == str(tmp_path)
    assert source_root("s3://bkt/d/s-{0..1}.tar") == "s3://bkt/d"
    assert source_root("s3://bkt/{x/a,x/b}.tar") == "s3://bkt/x"
    root = str(tmp_path / "photos")
    s = Sample(id="a/b", source="a/b.png", location=f"{root}/a/b.png", caption_file=f"{root}/a/b.txt")
    outside = Sample(id="o", source=str(tmp_path / "o.png"), location=str(tmp_path / "o.png"))
    url = Sample(id="u", source="s3://bkt/k.jpg", location="s3://bkt/k.jpg", offset=3, size=9)
    assert s.to_json(root) == {"id": "a/b", "source": "a/b.png", "location": "a/b.png", "caption_file": "a/b.txt",
                               "offset": 0, "size": -1}
    assert outside.to_json(root)["location"] == str(tmp_path / "o.png")  # outside the root: stays absolute
    assert url.to_json(root)["location"] == "s3://bkt/k.jpg"
    for x in (s, outside, url):
        assert Sample.from_json(x.to_json(root), root) == x
    moved = str(tmp_path / "moved")
    assert Sample.from_json(s.to_json(root), moved).location == f"{moved}/a/b.png"
    assert Sample.from_json(s.to_json(), moved) == s  # absolute records (older plans) are kept as they are
    tar = Sample(id="s/k", source="s.tar::k.jpg", location="s3://bkt/d/s.tar", offset=512, size=10)
    assert tar.to_json("s3://bkt/d")["location"] == "s.tar"
    assert Sample.from_json(tar.to_json("s3://bkt/d"), "s3://bkt/e").location == "s3://bkt/e/s.tar"
