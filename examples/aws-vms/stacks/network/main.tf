# One environment's network, as the example models it offline: a record of the address
# plan and the web hosts placed in it. A real stack would make a VPC, subnets and
# instances (aws_vpc, aws_subnet, aws_instance); the output has the same shape.
variable "environment" {
  type = string
}

variable "cidr" {
  type = string
}

variable "web_count" {
  type    = number
  default = 1
}

resource "terraform_data" "network" {
  input = { environment = var.environment, cidr = var.cidr }
}

output "web_hosts" {
  value = [
    for i in range(var.web_count) : {
      name    = "${var.environment}-web${i + 1}"
      address = cidrhost(var.cidr, 10 + i)
    }
  ]
}
