"""Caption sources read as LensToWords reads them; each kind of bad input gets a named error."""

import json
import random
import subprocess
import sys

import pytest

from lensjax.data.captions import (
    CaptionSet,
    caption_source,
    coco_subset,
    load_coco,
    load_flickr30k,
    load_instagram,
    load_karpathy,
    load_tfds_coco,
    seed_split,
)

FLICKR = (
    "image_name| comment_number| comment\n"
    "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
    "1000092795.jpg| 1|  Two young , White males are outside near many bushes . \n"
    "10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .\n"
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --- Flickr30k --------------------------------------------------------------------------------


def test_flickr_header_with_leading_spaces_is_read_and_values_stripped(tmp_path):
    caps = load_flickr30k(_write(tmp_path, "captions.txt", FLICKR))
    assert list(caps) == ["1000092795.jpg", "10002456.jpg"]
    assert caps["1000092795.jpg"] == [
        "Two young guys with shaggy hair look at their hands .",
        "Two young , White males are outside near many bushes .",
    ]
    assert caps["10002456.jpg"] == [
        "Several men in hard hats are operating a giant pulley system ."
    ]


def test_flickr_empty_lines_are_skipped(tmp_path):
    text = FLICKR.replace("\n10002456", "\n\n   \n10002456") + "\n\n"
    caps = load_flickr30k(_write(tmp_path, "captions.txt", text.replace("\n", "\r\n")))
    assert [len(v) for v in caps.values()] == [2, 1]


def test_flickr_wrong_header_names_expected_and_found(tmp_path):
    path = _write(tmp_path, "captions.txt", FLICKR.replace("comment_number", "number"))
    with pytest.raises(ValueError, match=r"captions\.txt:1: .*expected the header "
                       r"'image_name\| comment_number\| comment', found 'image_name\| number"):
        load_flickr30k(path)


def test_flickr_wrong_field_count_names_file_and_line(tmp_path):
    text = FLICKR + "10002456.jpg| 1| a caption | with a bar\n"
    with pytest.raises(ValueError, match=r"captions\.txt:5: expected 3 '\|'-separated fields.*"
                       r"found 4"):
        load_flickr30k(_write(tmp_path, "captions.txt", text))


def test_flickr_row_missing_its_second_bar_is_recovered(tmp_path):
    text = FLICKR + "2199200615.jpg| 4   A dog runs across the grass .\n"
    caps = load_flickr30k(_write(tmp_path, "captions.txt", text))
    assert caps["2199200615.jpg"] == ["A dog runs across the grass ."]


def test_flickr_row_with_one_field_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"captions\.txt:5: .*found 1"):
        load_flickr30k(_write(tmp_path, "captions.txt", FLICKR + "just some text\n"))


def test_flickr_non_utf8_line_is_named(tmp_path):
    data = FLICKR.encode() + b"10002456.jpg| 1| caf\xe9 in latin-1\n"
    with pytest.raises(ValueError, match=r"captions\.txt:5: not UTF-8 text \(byte 0xe9"):
        load_flickr30k(_write(tmp_path, "captions.txt", data))


def test_flickr_unicode_line_separators_inside_a_caption_do_not_split_it(tmp_path):
    text = FLICKR + "10002456.jpg| 1| a \u2028 b \x85 c\n10002456.jpg| 2| x | y\n"
    with pytest.raises(ValueError, match=r"captions\.txt:6: "):
        load_flickr30k(_write(tmp_path, "captions.txt", text))


def test_flickr_non_numeric_comment_number_is_an_error(tmp_path):
    text = FLICKR + "10002456.jpg| one| a caption\n"
    with pytest.raises(ValueError, match=r"captions\.txt:5: comment_number 'one'"):
        load_flickr30k(_write(tmp_path, "captions.txt", text))


def test_flickr_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"empty\.txt: empty caption file"):
        load_flickr30k(_write(tmp_path, "empty.txt", ""))


def test_flickr_header_only_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no captions after the header"):
        load_flickr30k(_write(tmp_path, "captions.txt", "image_name| comment_number| comment\n"))


def test_flickr_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        load_flickr30k(tmp_path / "nope.txt")


def test_flickr_kaggle_csv_layout_is_read(tmp_path):
    text = 'image,caption\n1.jpg,"A dog, running ."\n1.jpg,A dog .\n2.jpg,A cat .\n'
    caps = load_flickr30k(_write(tmp_path, "captions.txt", text))
    assert caps == {"1.jpg": ["A dog, running .", "A dog ."], "2.jpg": ["A cat ."]}


# --- Karpathy and COCO JSON -------------------------------------------------------------------


def _karpathy(tmp_path):
    images = [
        {"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": f" cap {i} a "},
                                                               {"raw": f"cap {i} b"}]}
        for i, split in enumerate(["train", "val", "test", "restval", "train"])
    ]
    return _write(tmp_path, "dataset_flickr30k.json", json.dumps({"images": images}))


def test_karpathy_reads_every_split_by_default(tmp_path):
    caps = load_karpathy(_karpathy(tmp_path))
    assert list(caps) == [f"{i}.jpg" for i in range(5)]
    assert caps["0.jpg"] == ["cap 0 a", "cap 0 b"]


def test_karpathy_split_filter_and_restval_counts_as_train(tmp_path):
    path = _karpathy(tmp_path)
    assert list(load_karpathy(path, "val")) == ["1.jpg"]
    assert list(load_karpathy(path, "test")) == ["2.jpg"]
    assert list(load_karpathy(path, "restval")) == ["3.jpg"]
    assert list(load_karpathy(path, "train")) == ["0.jpg", "3.jpg", "4.jpg"]
    assert list(load_karpathy(path, "train", restval_as_train=False)) == ["0.jpg", "4.jpg"]


def test_karpathy_unknown_split_lists_the_splits_present(tmp_path):
    with pytest.raises(ValueError, match=r"no images in split 'dev'.*'restval', 'test'"):
        load_karpathy(_karpathy(tmp_path), "dev")


def test_karpathy_missing_sentence_field_is_named(tmp_path):
    data = {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]}
    path = _write(tmp_path, "k.json", json.dumps(data))
    with pytest.raises(ValueError, match=r"missing required field 'images\[0\]\.sentences\[0\]"
                       r"\.raw'"):
        load_karpathy(path)


def _coco(tmp_path, **override):
    data = {
        "images": [{"id": 139, "file_name": "000000000139.jpg"},
                   {"id": 285, "file_name": "000000000285.jpg"},
                   {"id": 632, "file_name": "000000000632.jpg"}],
        "annotations": [{"image_id": 285, "id": 1, "caption": " A big bear . "},
                        {"image_id": 139, "id": 2, "caption": "A room ."},
                        {"image_id": 285, "id": 3, "caption": "A brown bear ."}],
    }
    data.update(override)
    return _write(tmp_path, "captions_val2017.json", json.dumps(data))


def test_coco_keys_are_file_names_in_image_order(tmp_path):
    caps = load_coco(_coco(tmp_path))
    assert caps == {"000000000139.jpg": ["A room ."],
                    "000000000285.jpg": ["A big bear .", "A brown bear ."]}
    assert list(caps) == ["000000000139.jpg", "000000000285.jpg"]


def test_coco_missing_annotations_field_is_named(tmp_path):
    path = _write(tmp_path, "c.json", json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"c\.json: missing required field 'annotations'"):
        load_coco(path)


def test_coco_missing_caption_field_is_named(tmp_path):
    path = _coco(tmp_path, annotations=[{"image_id": 139, "id": 1}])
    with pytest.raises(ValueError, match=r"missing required field 'annotations\[0\]\.caption'"):
        load_coco(path)


def test_coco_missing_file_name_is_named(tmp_path):
    path = _coco(tmp_path, images=[{"id": 139}])
    with pytest.raises(ValueError, match=r"missing required field 'images\[0\]\.file_name'"):
        load_coco(path)


def test_coco_annotation_of_unknown_image_is_an_error(tmp_path):
    path = _coco(tmp_path, annotations=[{"image_id": 7, "caption": "x"}])
    with pytest.raises(ValueError, match=r"annotations\[0\]\.image_id 7 is not the id of any"):
        load_coco(path)


def test_coco_invalid_json_names_line(tmp_path):
    path = _write(tmp_path, "c.json", '{"images": [],\n "annotations": [}\n')
    with pytest.raises(ValueError, match=r"c\.json:2: not valid JSON"):
        load_coco(path)


def test_coco_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"c\.json: empty caption file"):
        load_coco(_write(tmp_path, "c.json", ""))


# --- Instagram CSV ----------------------------------------------------------------------------


def test_instagram_image_file_caption_header(tmp_path):
    text = 'Image File,Caption\na.jpg,"sunset, beach and ""friends"""\nb.jpg,coffee\n'
    caps = load_instagram(_write(tmp_path, "insta.csv", text))
    assert caps == {"a.jpg": ['sunset, beach and "friends"'], "b.jpg": ["coffee"]}


def test_instagram_headerless_three_columns(tmp_path):
    text = '0,a.jpg,first caption\n1,b.jpg,"second, with comma"\n2,a.jpg,third\n'
    caps = load_instagram(_write(tmp_path, "insta.csv", text))
    assert caps == {"a.jpg": ["first caption", "third"], "b.jpg": ["second, with comma"]}


def test_instagram_image_name_caption_header(tmp_path):
    text = "image_name,caption\na.jpg,hello 🌅\n"
    assert load_instagram(_write(tmp_path, "insta.csv", text)) == {"a.jpg": ["hello 🌅"]}


def test_instagram_pandas_index_column_header(tmp_path):
    text = ",Image File,Caption\n0,a.jpg,one\n1,b.jpg,two\n"
    assert load_instagram(_write(tmp_path, "i.csv", text)) == {"a.jpg": ["one"], "b.jpg": ["two"]}


def test_instagram_several_files_are_concatenated_in_order(tmp_path):
    one = _write(tmp_path, "one.csv", "Image File,Caption\na.jpg,x\nb.jpg,y\n")
    two = _write(tmp_path, "two.csv", "0,c.jpg,z\n1,a.jpg,w\n")
    caps = load_instagram([one, two])
    assert caps == {"a.jpg": ["x", "w"], "b.jpg": ["y"], "c.jpg": ["z"]}
    assert list(caps) == ["a.jpg", "b.jpg", "c.jpg"]


def test_instagram_empty_captions_are_skipped(tmp_path):
    text = "Image File,Caption\na.jpg,\nb.jpg,  \nc.jpg,kept\n"
    assert load_instagram(_write(tmp_path, "i.csv", text)) == {"c.jpg": ["kept"]}


def test_instagram_wrong_field_count_names_line(tmp_path):
    text = "Image File,Caption\na.jpg,x\nb.jpg,y,extra\n"
    with pytest.raises(ValueError, match=r"i\.csv:3: expected 2 CSV fields, found 3"):
        load_instagram(_write(tmp_path, "i.csv", text))


def test_instagram_unknown_header_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"i\.csv:1: unknown Instagram CSV layout"):
        load_instagram(_write(tmp_path, "i.csv", "picture,text_of_post\na.jpg,x\n"))


def test_instagram_headerless_without_integer_index_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"i\.csv:1: expected an integer index"):
        load_instagram(_write(tmp_path, "i.csv", "id,img,txt\n0,a.jpg,x\n"))


def test_instagram_non_utf8_line_is_named(tmp_path):
    data = b"Image File,Caption\na.jpg,ok\nb.jpg,\xff\xfe bad\n"
    with pytest.raises(ValueError, match=r"i\.csv:3: not UTF-8 text"):
        load_instagram(_write(tmp_path, "i.csv", data))


def test_instagram_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"i\.csv: empty CSV file"):
        load_instagram(_write(tmp_path, "i.csv", "\n\n"))


# --- Splits -----------------------------------------------------------------------------------


def test_seed_split_matches_the_originals_global_random_procedure():
    keys = [f"{i}.jpg" for i in range(1000)]
    state = random.getstate()
    try:
        expected = list(keys)
        random.seed(42)
        random.shuffle(expected)
    finally:
        random.setstate(state)
    train, val = seed_split(keys, seed=42, train_frac=0.9)
    assert train == expected[:900] and val == expected[900:]


def test_seed_split_leaves_global_random_state_alone():
    state = random.getstate()
    seed_split(range(10))
    assert random.getstate() == state


def test_seed_split_flickr30k_sizes():
    train, val = seed_split([f"{i}.jpg" for i in range(31_783)], seed=42, train_frac=0.9)
    assert (len(train), len(val)) == (28_604, 3_179)
    assert not set(train) & set(val)


def test_coco_subset_is_seeded_sized_and_in_original_order():
    keys = [f"{i:012d}.jpg" for i in range(2000)]
    subset = coco_subset(keys, size=500, seed=0)
    assert len(subset) == len(set(subset)) == 500
    assert subset == sorted(subset)  # original order kept
    assert coco_subset(keys, size=500, seed=0) == subset
    assert coco_subset(keys, size=500, seed=1) != subset


def test_coco_subset_larger_than_keys_is_an_error():
    with pytest.raises(ValueError, match=r"subset size 11 .* 10 keys"):
        coco_subset([str(i) for i in range(10)], size=11)


# --- CaptionSet -------------------------------------------------------------------------------


def test_missing_images_are_reported_in_order(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "10002456.jpg").write_bytes(b"x")
    source = caption_source(_write(tmp_path, "captions.txt", FLICKR), image_dir=images)
    assert isinstance(source, CaptionSet)
    assert source.missing_images() == ["1000092795.jpg"]
    assert source.image_path("10002456.jpg") == images / "10002456.jpg"
    assert len(source.pairs()) == 3


def test_caption_set_without_image_dir_has_no_image_paths():
    source = CaptionSet({"a.jpg": ["x"]})
    assert source.missing_images() == []
    with pytest.raises(ValueError, match=r"no image folder"):
        source.image_path("a.jpg")


def test_caption_source_detects_each_format(tmp_path):
    assert list(caption_source(_coco(tmp_path)).captions) == ["000000000139.jpg",
                                                              "000000000285.jpg"]
    assert list(caption_source(_karpathy(tmp_path), split="val").captions) == ["1.jpg"]
    insta = _write(tmp_path, "i.csv", "Image File,Caption\na.jpg,x\n")
    assert caption_source(insta).captions == {"a.jpg": ["x"]}
    assert len(caption_source(_write(tmp_path, "captions.txt", FLICKR))) == 2


def test_caption_source_refuses_split_for_flickr(tmp_path):
    with pytest.raises(ValueError, match=r"use seed_split|with seed_split"):
        caption_source(_write(tmp_path, "captions.txt", FLICKR), split="val")


# --- TFDS -------------------------------------------------------------------------------------


def test_tfds_coco_captions_via_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        caps = load_tfds_coco(split="val")
    assert len(caps) == 6  # mock file names are random strings: check structure only
    for name, captions in caps.items():
        assert isinstance(name, str) and name
        assert captions and all(isinstance(c, str) and c == c.strip() for c in captions)


def test_tfds_not_prepared_is_file_not_found(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"not prepared"):
        load_tfds_coco(split="val", data_dir=tmp_path)


def test_importing_the_caption_loaders_does_not_import_tensorflow():
    code = "import sys, lensjax.data.captions; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
