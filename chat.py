"""Chat with a CLSA / YOCO model: `python chat.py [--model PATH] [--file DOC] [--prompt TEXT]`
(`clsa-chat` and `python -m clsa_mlx.chat` once installed)."""

from clsa_mlx.chat import main

if __name__ == "__main__":
    main()
