"""Package metadata comes from settings.ini, the one place nbdev and pip both read."""
from configparser import ConfigParser
from pathlib import Path

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache-2.0",
    url=cfg["git_url"],
    keywords=cfg["keywords"].split(),
    python_requires=">=" + cfg["min_python"],
    packages=setuptools.find_packages(include=["saealign", "saealign.*"]),
    # the shipped SAEs (sae_lens save format: cfg.json + safetensors) and the topic texts
    package_data={"saealign": ["saes/*/*.json", "saes/*/*/*.json", "saes/*/*/*.safetensors", "topics/*.json",
                               "shipped/*/*.json", "shipped/*/*.safetensors", "shipped/*/*/*.json", "shipped/*/*/*.safetensors"]},
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split(), "ray": cfg["ray_requirements"].split(),
                    "llamacpp": cfg["llamacpp_requirements"].split()},
    entry_points={
        "console_scripts": cfg["console_scripts"].split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    zip_safe=False,
)
