// One worker task as an Azure Container Instances group: one container, run
// once (restart policy Never), image pulled through the runtime identity,
// secrets as secure environment variables, stdout/stderr to Log Analytics.
//
// This is the shape the Logic App creates for every queue message
// (infra/aci/logic-app-trigger.bicep writes the same body as JSON);
// tests/infra.rs keeps the two and the binary in agreement.
//
// ACI stops a container without a SIGTERM grace period, so the in-container
// WORKER_TASK_TIMEOUT is the only timeout guard on this path: it must stay
// below anything that would stop the group from outside.

@description('Container group name: at most 63 lowercase letters, digits and single hyphens.')
@minLength(1)
@maxLength(63)
param name string

param location string = resourceGroup().location

@description('Tags; the cleanup workflow deletes finished groups tagged managed-by=worker-task.')
param tags object = {}

@description('Full image reference, e.g. myregistry.azurecr.io/worker:<git sha>.')
param image string

param registryLoginServer string

@description('Resource id of the user-assigned identity holding AcrPull.')
param identityId string

@description('vCPU cores (a decimal string, e.g. 1 or 0.5).')
param cpuCores string = '1'

@description('Memory in GB (a decimal string, e.g. 2 or 1.5).')
param memoryInGb string = '2'

@description('The task envelope (JSON or base64 JSON): what a queue message holds.')
param taskData string

@description('WORKER_TASK_TIMEOUT in seconds: the only timeout on this path.')
param taskTimeoutSeconds int = 1800

@description('Log Analytics workspace receiving the container logs.')
param workspaceName string

@secure()
param webhookSecret string

@secure()
param supabaseKey string

@secure()
param openaiApiKey string

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource group 'Microsoft.ContainerInstance/containerGroups@2023-05-01' = {
  name: name
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    osType: 'Linux'
    sku: 'Standard'
    restartPolicy: 'Never'
    imageRegistryCredentials: [
      {
        server: registryLoginServer
        identity: identityId
      }
    ]
    containers: [
      {
        name: 'worker'
        properties: {
          image: image
          resources: {
            requests: {
              cpu: json(cpuCores)
              memoryInGB: json(memoryInGb)
            }
          }
          environmentVariables: [
            {
              name: 'TASK_DATA'
              value: taskData
            }
            {
              name: 'WORKER_LOG_FORMAT'
              value: 'json'
            }
            {
              name: 'WORKER_TASK_TIMEOUT'
              value: string(taskTimeoutSeconds)
            }
            {
              name: 'WORKER_WEBHOOK_SECRET'
              secureValue: webhookSecret
            }
            {
              name: 'SUPABASE_KEY'
              secureValue: supabaseKey
            }
            {
              name: 'OPENAI_API_KEY'
              secureValue: openaiApiKey
            }
          ]
        }
      }
    ]
    diagnostics: {
      logAnalytics: {
        workspaceId: workspace.properties.customerId
        workspaceKey: workspace.listKeys().primarySharedKey
        logType: 'ContainerInstanceLogs'
      }
    }
  }
}

output name string = group.name
output id string = group.id
