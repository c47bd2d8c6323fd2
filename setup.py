"""imagen-jax: Imagen-style cascaded text-to-image diffusion in JAX/Flax NNX."""
import setuptools

# Version ranges are the ones the project is tested on; the upper bounds keep a new
# major release of jax/flax/orbax (which change APIs often) from breaking installs.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "gin-config>=0.5,<0.6",
    "seqio>=0.0.20,<0.1",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8,<0.9",
    "sentencepiece>=0.2,<0.3",
    "safetensors>=0.5,<1",
    "pillow>=10,<14",
    "tqdm>=4.66,<5",
    "tensorboard>=2.21,<3",
    "etils[epath]>=1.7,<2",
    "numpy>=1.26,<3",
    "scipy>=1.11,<2",
    "grain>=0.2.12,<0.3",
    "pyarrow>=14",
]

setuptools.setup(
    name="imagen-jax",
    version="0.1.0",
    description="Imagen-style cascaded text-to-image diffusion models in JAX/Flax NNX",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["imagen_jax", "imagen_jax.*"]),
    package_data={"imagen_jax.eval": ["data/*.tsv"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "scikit-image>=0.22", "pyyaml>=6"]},
    entry_points={
        "console_scripts": [
            "imagen-train=imagen_jax.cli.train:main",
            "imagen-sample=imagen_jax.cli.sample:main",
            "imagen-embed=imagen_jax.cli.embed:main",
            "imagen-plan=imagen_jax.cli.plan:main",
            "imagen-eval=imagen_jax.cli.eval:main",
            "imagen-data=imagen_jax.cli.data:main",
        ]
    },
)
