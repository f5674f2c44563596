"""``python -m crossent``: print the article's worked examples, computed by the library."""

from .article import format_table


def main() -> None:
    print("crossent: the article's worked examples, computed (not typed in)\n")
    print(format_table())


if __name__ == "__main__":
    main()
