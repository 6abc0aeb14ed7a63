// One worker container group, deployed by hand: the manual test of the ACI
// path (an `echo` task) and the reference for the group the Logic App
// creates for each queue message. Secrets are read from the Key Vault at
// deployment time and reach the container only as secure values.
//
//   az deployment group create -g <rg> -f infra/aci/worker-container.bicep \
//     -p client=<client> imageTag=<sha> registryName=... identityName=... \
//        keyVaultName=... workspaceName=... storageAccountName=...
//        (all five are outputs of main.bicep)

@minLength(2)
@maxLength(20)
param client string

param location string = resourceGroup().location

param imageTag string
param registryName string
param identityName string
param keyVaultName string
param workspaceName string
param storageAccountName string

@secure()
@description('The task envelope, as a queue message would hold it (JSON or base64 JSON), e.g. {"task_id":"manual-echo-1","task_type":"echo","payload":{"hello":"from aci"}}. Secure, so no default: it reaches the group as a secure value.')
param taskData string

@description('Group name: at most 63 lowercase letters, digits and single hyphens.')
@maxLength(63)
param groupName string = '${client}-manual-${uniqueString(taskData)}'

@description('vCPU cores (decimal string).')
param cpuCores string = '1'

@description('Memory in GB (decimal string).')
param memoryInGb string = '2'

@description('WORKER_TASK_TIMEOUT in seconds.')
param taskTimeoutSeconds int = 1800

// ISO 8601 round-trip format ('o', e.g. 2026-05-01T17:53:18.1234567Z), the
// format the Logic App's utcNow() writes into the same tag and that ticks()
// in the cleanup workflow parses; ARM's utcNow() without a format would give
// the basic form 20260501T175318Z.
@description('Creation time (ISO 8601), recorded in a tag for the cleanup workflow.')
param createdAt string = utcNow('o')

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: identityName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

module group '../modules/container-group.bicep' = {
  name: 'worker-${groupName}'
  params: {
    name: groupName
    location: location
    tags: {
      'managed-by': 'worker-task'
      'worker-client': client
      'worker-created': createdAt
    }
    image: '${registry.properties.loginServer}/worker:${imageTag}'
    registryLoginServer: registry.properties.loginServer
    identityId: identity.id
    identityClientId: identity.properties.clientId
    client: client
    storageAccountName: storageAccountName
    cpuCores: cpuCores
    memoryInGb: memoryInGb
    taskData: taskData
    taskTimeoutSeconds: taskTimeoutSeconds
    workspaceName: workspaceName
    webhookSecret: vault.getSecret('WORKER-WEBHOOK-SECRET')
    supabaseKey: vault.getSecret('SUPABASE-KEY')
    openaiApiKey: vault.getSecret('OPENAI-API-KEY')
  }
}

output groupName string = group.outputs.name
