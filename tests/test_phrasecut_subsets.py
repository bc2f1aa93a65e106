"""Membership in PhraseCut's official evaluation subsets."""

import json

from phrasecut_dataset import OFFICIAL_SUBSETS, FrequencyRanks, read_frequency_ranks, task_subsets

RANKS = FrequencyRanks(
    categories={**{f"cat{i}": i for i in range(600)}, "person": 3, "street": 150},
    attributes={**{f"att{i}": i for i in range(300)}, "white": 0, "standing up": 120},
)


def structure(name, attributes=(), relations=(), type_="name"):
    return {
        "name": name,
        "attributes": list(attributes),
        "relation_ids": list(range(len(relations))),
        "relation_descriptions": [list(r) for r in relations],
        "type": type_,
    }


def subsets(phrase_structure, num_instances=1, relative_size=0.1, coco_id=None, ranks=RANKS):
    return task_subsets(phrase_structure, num_instances, relative_size, coco_id, ranks)


def test_a_coco_person_with_a_colour():
    got = subsets(structure("person", ["white"], type_="attribute"), coco_id=123)
    assert got == [
        "all", "c_coco", "c20", "c100", "c500", "i_single", "p_att", "p_att+", "t_obj", "s_mid",
        "a20", "a100", "a200", "a_color", "d_cocotv",
    ]  # fmt: skip


def test_category_rank_buckets_are_exclusive_and_cumulative():
    assert {"c21-100", "c100", "c500"} <= set(subsets(structure("cat20")))
    assert "c20" not in subsets(structure("cat20"))
    assert {"c101-500", "c500"} <= set(subsets(structure("cat100")))
    assert "c100" not in subsets(structure("cat100"))
    assert "c500+" in subsets(structure("cat500"))
    assert "c500+" in subsets(structure("never seen"))  # unranked: rank 501
    assert "c500" not in subsets(structure("never seen"))


def test_attribute_rank_is_the_best_of_the_phrase_and_none_means_a200_plus():
    assert {"a21-100", "a100", "a200"} <= set(subsets(structure("x", ["att250", "att30"])))
    assert "a101-200" in subsets(structure("x", ["att150"]))
    assert "a200+" in subsets(structure("x"))
    assert "a200+" in subsets(structure("x", ["unknown"]))


def test_instances_sizes_and_phrase_structure():
    assert "i_single" in subsets(structure("x"), num_instances=1)
    assert "i_multi" in subsets(structure("x"), num_instances=4)
    assert "i_many" in subsets(structure("x"), num_instances=5)
    assert "s_small" in subsets(structure("x"), relative_size=0.0199)
    assert "s_mid" in subsets(structure("x"), relative_size=0.02)
    assert "s_mid" in subsets(structure("x"), relative_size=0.2)
    assert "s_large" in subsets(structure("x"), relative_size=0.2001)
    rel = subsets(structure("x", ["white", "att5"], [("on", "grass"), ("near", "tree")], type_="relation"))
    assert {"p_att", "p_attm", "p_rel", "p_relm", "p_att_rel", "p_rel+"} <= set(rel)
    assert "p_verbose" in subsets(structure("x", type_="verbose"))


def test_stuff_is_a_substring_test_on_the_name():
    assert "t_stuff" in subsets(structure("street"))
    assert "t_stuff" in subsets(structure("palm tree"))
    assert "t_obj" in subsets(structure("dog"))


def test_attribute_types():
    got = subsets(structure("man", ["standing up", "in the background", "wooden"]))
    assert {"a_state", "a_loc", "a_material"} <= set(got)
    assert "a_color" not in got


def test_without_frequency_ranks_the_rank_subsets_are_left_out():
    got = subsets(structure("person", ["white"]), ranks=None)
    assert not any(s[0] in "ca" and s[1:2].isdigit() for s in got)
    assert "c_coco" in got and "a_color" in got


def test_order_follows_the_official_list():
    got = subsets(structure("street", ["white"], [("on", "road")], type_="relation"), num_instances=7)
    assert got == [s for s in OFFICIAL_SUBSETS if s in got]


def test_read_frequency_ranks_uses_the_first_occurrence(tmp_path):
    path = tmp_path / "name_att_rel_count.json"
    path.write_text(json.dumps({"cat": [["a", 9], ["b", 5], ["a", 1]], "att": [["x", 3]], "rel": []}))
    ranks = read_frequency_ranks(path)
    assert ranks.categories == {"a": 0, "b": 1}
    assert ranks.attributes == {"x": 0}
