"""Files beside the weights travel with the artifact: sentence-transformers modules, chat templates."""

import json

from lyoncompress import factorize
from lyoncompress.recipe import Recipe
from tests.helpers import make_mlp_checkpoint


def test_sentence_transformers_modules_and_chat_template_travel(tmp_path):
    ckpt, _ = make_mlp_checkpoint(tmp_path / "ckpt")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        {"idx": 3, "name": "3", "path": "../outside", "type": "sentence_transformers.models.Dense"},
    ]
    (ckpt / "modules.json").write_text(json.dumps(modules))
    (ckpt / "1_Pooling").mkdir()
    (ckpt / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (ckpt / "2_Normalize").mkdir()
    (ckpt / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("not the model's")
    factorize(ckpt, tmp_path / "fact", Recipe(method="lowrank"))
    fact = tmp_path / "fact"
    for name in ("modules.json", "sentence_bert_config.json", "chat_template.jinja", "1_Pooling/config.json"):
        assert (fact / name).read_bytes() == (ckpt / name).read_bytes()
    assert (fact / "2_Normalize").is_dir()
    assert "outside" not in {p.name for p in fact.iterdir()}  # a path leaving the folder is ignored
