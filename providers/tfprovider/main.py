"""Entry point of the `terraform-provider-localfile` executable that Terraform starts."""

from __future__ import annotations


def main() -> None:
    from tf.runner import run_provider

    from providers.tfprovider.localfile import LocalFileProvider

    run_provider(LocalFileProvider())


if __name__ == "__main__":
    main()
