// The runtime identity of worker containers: a user-assigned managed identity
// so that its AcrPull grant exists before the first container group does
// (a system-assigned identity would be born with the group, too late to pull
// the group's own image).

param name string
param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output principalId string = identity.properties.principalId
output clientId string = identity.properties.clientId
