// Storage account holding the task queues and the webhook outbox.
//
// The worker's naming convention lives here: tasks arrive on `<client>-tasks`,
// and messages that can never succeed are moved verbatim to
// `<client>-tasks-poison`. Webhook outcomes that could not be delivered at
// once wait in `<client>-webhooks` (the outbox; each entry stays invisible
// until its next attempt is due), and the ones given up on end in
// `<client>-webhooks-poison`. These are the names the binary derives from
// WORKER_CLIENT; it would create the two outbox queues itself when missing,
// but creating all four here lets the scaler and the Logic App find them from
// the start. tests/infra.rs checks the names against that rule. An outcome too
// large for a queue message is kept as a blob in the container
// `<client>-webhooks`, which the worker creates on first use; the outbox entry
// points to it.

@description('Client name; queues are <client>-tasks, <client>-tasks-poison, <client>-webhooks and <client>-webhooks-poison.')
@minLength(2)
@maxLength(20)
param client string

@description('Storage account name (3-24 lowercase letters and digits).')
@minLength(3)
@maxLength(24)
param accountName string

param location string = resourceGroup().location
param tags object = {}

@description('Principal ids granted Storage Queue Data Contributor (task queues, outbox) and Storage Blob Data Contributor (outcomes too large for a queue message) on the account: the worker identity.')
param dataContributorPrincipalIds array = []

var tasksQueueName = '${client}-tasks'
var poisonQueueName = '${client}-tasks-poison'
var webhooksQueueName = '${client}-webhooks'
var webhooksPoisonQueueName = '${client}-webhooks-poison'
var queueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var blobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: accountName
  location: location
  tags: tags
  // checkov:skip=CKV_AZURE_43: The name is a parameter; main.bicep builds it from letters and digits only and cuts it to 24 characters.
  kind: 'StorageV2'
  sku: {
    name: 'Standard_GRS'
  }
  properties: {
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    // Shared keys stay enabled: AZURE_STORAGE_CONNECTION_STRING (VPS, local tools)
    // is built from one. Managed identities use Entra roles instead.
    allowSharedKeyAccess: true
    // checkov:skip=CKV_AZURE_59: A Consumption Logic App has no fixed outbound address and is no trusted service for queues (README, trade-offs); every request still needs a key or an Entra role.
    publicNetworkAccess: 'Enabled'
    // checkov:skip=CKV_AZURE_35: Same trade-off as CKV_AZURE_59: the firewall cannot name the Logic App connector's addresses.
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      services: {
        queue: {
          enabled: true
          keyType: 'Account'
        }
        blob: {
          enabled: true
        }
      }
    }
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource tasksQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: tasksQueueName
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: poisonQueueName
}

resource webhooksQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: webhooksQueueName
}

resource webhooksPoisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: webhooksPoisonQueueName
}

resource queueContributors 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in dataContributorPrincipalIds: {
  name: guid(account.id, principalId, queueDataContributorRoleId)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', queueDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

// The outbox's blob container (created by the worker on first use).
resource blobContributors 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in dataContributorPrincipalIds: {
  name: guid(account.id, principalId, blobDataContributorRoleId)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output accountName string = account.name
output accountId string = account.id
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tasksQueueName string = tasksQueue.name
output poisonQueueName string = poisonQueue.name
output webhooksQueueName string = webhooksQueue.name
output webhooksPoisonQueueName string = webhooksPoisonQueue.name
