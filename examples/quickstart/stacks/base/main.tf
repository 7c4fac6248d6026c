# The base stack: an environment record and the directory other stacks write into.
terraform {
  required_providers {
    localfile = {
      source = "gitops-agent.local/builtin/localfile"
    }
  }
}

variable "environment" {
  type = string
}

variable "target_dir" {
  type        = string
  description = "Where the managed files live."
}

resource "terraform_data" "environment" {
  input = var.environment
}

resource "localfile_file" "motd" {
  path    = "${var.target_dir}/motd.txt"
  content = "Welcome to the ${var.environment} environment.\nThis file is managed by gitops-agent: edit it in Git, not here.\n"
}

output "config_dir" {
  value = var.target_dir
}

output "environment" {
  value = terraform_data.environment.output
}
