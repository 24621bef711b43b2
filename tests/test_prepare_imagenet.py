"""The shipped ILSVRC-2012 class list: Keras's VGG16 output order."""

from influence import imagenet


def test_class_list_is_the_1000_sorted_wnids():
    wnids = imagenet.wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # Keras's order is the sorted order of the wnids
    assert all(imagenet.looks_like_wnid(wnid) for wnid in wnids)


def test_known_labels_and_names():
    # Spot checks against keras.applications.imagenet_utils' imagenet_class_index.json
    for label, wnid, name in [(0, "n01440764", "tench"), (1, "n01443537", "goldfish"),
                              (207, "n02099601", "golden_retriever"), (281, "n02123045", "tabby"),
                              (619, "n03637318", "lampshade"), (765, "n04099969", "rocking_chair"),
                              (779, "n04146614", "school_bus"), (831, "n04344873", "studio_couch"),
                              (846, "n04380533", "table_lamp"), (999, "n15075141", "toilet_tissue")]:
        assert imagenet.label_of(wnid) == label
        assert imagenet.class_name(label) == name
        assert imagenet.is_wnid(wnid)
    assert imagenet.label_of("n00000000") is None and not imagenet.is_wnid("n00000000")
    assert imagenet.looks_like_wnid("n00000000") and not imagenet.looks_like_wnid("cat")
    # two classes share the name "maillot" and two "crane" in Keras's list: names are not keys
    assert [imagenet.class_name(label) for label in (638, 639, 134, 517)] == ["maillot", "maillot", "crane", "crane"]
