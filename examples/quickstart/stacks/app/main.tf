# The app stack: a config file placed in the directory the base stack owns.
terraform {
  required_providers {
    localfile = {
      source = "gitops-agent.local/builtin/localfile"
    }
  }
}

variable "config_dir" {
  type        = string
  description = "From the base stack's output config_dir."
}

variable "replicas" {
  type = number
}

variable "greeting" {
  type = string
}

resource "localfile_file" "app_conf" {
  path            = "${var.config_dir}/app.conf"
  file_permission = "0640"
  content         = <<-EOT
    # managed by gitops-agent (stack app)
    replicas = ${var.replicas}
    greeting = "${var.greeting}"
  EOT
}

resource "terraform_data" "release" {
  input = {
    replicas = var.replicas
    checksum = sha256(localfile_file.app_conf.content)
  }
}

output "app_conf" {
  value = localfile_file.app_conf.path
}
