"""Chat with a CLSA / YOCO model: `python chat.py [--model PATH] [--file DOC] [--prompt TEXT]`."""

from clsa_mlx.chat import main

if __name__ == "__main__":
    main()
